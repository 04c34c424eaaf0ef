"""The default configuration: every key the library and scripts read, with its meaning.

`configs/*.py` files start from `default_config()` and override what differs; scripts load them with
`ml_collections.config_flags` and `lock_config=True`, so a misspelt key is an error, not a silent default.
"""

import ml_collections

__all__ = ["default_config"]


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # The face model: a built-in name (canonsal_jax.models.names()), onnx:PATH, PATH.py:factory,
  # package.module:factory, or a name given to canonsal_jax.models.register.
  config.model = "gender"
  config.model_card = ""  # an onnx:PATH model's JSON card; "" looks for PATH.json beside the file

  # Face detection (dlib HOG; "cnn" uses dlib's mmod detector). The largest face is explained.
  config.detector = "hog"
  config.upsample = 1  # detector image pyramid upsampling; raise it for small faces
  # Added to the detector's threshold (dlib's adjust_threshold). dlib's own default is 0; at upsample 1 the
  # HOG detector finds a weak false face (score 0.12) on the astronaut's suit, nearly as large as her face
  # (score 1.16). Lower this for hard images (profiles, blur), raise it if false faces win.
  config.detector_threshold = 0.3
  # Keep every photo's detections and landmarks in the cache folder (`faces.DetectionCache`, keyed by the
  # pixels and the detector settings), so a second run over the same photos, with any model, detects nothing.
  config.detection_cache = True

  # The 3D morphable model: "default" (built from CC0 MakeHuman assets at first use) or the folder of a
  # Surrey Face Model copy (sfm_shape_3448.bin and its companions; non-commercial licence, never bundled).
  config.morphable_model = "default"

  config.occlusion = ml_collections.ConfigDict()
  # Patch side: odd crop pixels if >= 1 (e.g. 3), a fraction of the face width if < 1. The paper uses 15 px
  # patches on a 224 px face, about 7% of its width (0.07: 1 px on the gender model's 32 px chip, 3 px on
  # the 64 px age and expression crops).
  config.occlusion.patch_size = 0.07
  config.occlusion.stride = 1
  # "black" / "white" (that pixel colour run through the model's preprocessing, the paper's black square),
  # a float constant in model input space, "mean" (the crop's per-channel mean) or "blur".
  config.occlusion.baseline = "black"
  config.occlusion.batch_size = 16  # occluded images per forward pass (16 is the fastest on a 2-core CPU)
  config.occlusion.reduce = "mean"  # "mean" or "sum" of the drops of the patches covering a pixel
  # Score: "" for the model's natural score (gender: log-odds, age: expected age, expression: log-softmax),
  # else one of canonsal_jax.models.SCORE_KINDS.
  config.occlusion.score = ""
  config.occlusion.target = -1  # class index to explain; -1 = the unoccluded prediction
  config.occlusion.contrast = -1  # a second class index: explain score(target) - score(contrast); -1 = none
  # Verification saliency (embedding models such as `identity`, cosine score): a photo of the person the face is
  # compared with; the drop in cosine similarity to its descriptor is explained. "" = self-identity (the
  # unoccluded face's own descriptor). With an impostor photo too, cos(genuine) - cos(impostor) is explained:
  # what makes the face this person rather than that one.
  config.occlusion.reference = ""
  config.occlusion.impostor = ""

  # What makes the crop heatmap: "occlusion" (the paper's method), or a rival from canonsal_jax.attribution
  # ("vanilla_gradient", "integrated_gradients", "grad_cam", "grad_cam_plus_plus", "score_cam", "rise"), carried
  # through the same canonical pipeline so comparisons are like for like (a canonical Grad-CAM map). Rivals
  # explain the same score and target as `occlusion` (config.occlusion.score / target / contrast / reference).
  config.explainer = "occlusion"
  config.attribution = ml_collections.ConfigDict()
  config.attribution.baseline = "black"  # integrated gradients' start, Score-CAM's and RISE's fill (as occlusion)
  config.attribution.steps = 32  # integrated gradients: quadrature nodes
  config.attribution.num_masks = 2000  # RISE: random masks
  config.attribution.seed = 0  # RISE: mask seed
  config.attribution.batch_size = 16  # inputs per forward pass

  # Canonical Image Saliency: the crop heatmap carried onto the 3DMM's texture through the fitted mesh.
  config.cis = ml_collections.ConfigDict()
  config.cis.texture_size = 0  # texture side in texels; 0 = what the model crop resolves on this 3DMM's UV layout
  config.cis.cosine_weight = False  # weight texels by cos(view angle), so grazing views count less
  config.cis.render_size = 512  # side of the canonical face render in figures, pixels (shown at ~3.4 in, 150 dpi)

  # Canonical Model Saliency over a dataset.
  config.cms = ml_collections.ConfigDict()
  # A folder, a .txt list or a glob of photos; "builtin:lfw" (the astronaut and scikit-image's 100 LFW face
  # crops, upscaled) or "builtin:photos" (9 real colour photos); "" = "builtin:lfw".
  config.cms.dataset = ""
  config.cms.min_count = 1  # written maps show texels seen by at least this many images (the rest: no data)
  config.cms.normalisation = "max_abs"  # per-image normaliser: "none", "max_abs" or "sum_abs" (see cms.py)
  config.cms.group_by_prediction = True  # also one CMS per predicted class (classifiers; not an expected age)
  config.cms.checkpoint_every = 8  # images between atomic checkpoints (a resumed run equals an uninterrupted one)
  config.cms.max_images = 0  # process at most this many new images in this run (0 = all); rerun to go on
  config.cms.num_threads = 2  # host threads decoding and detecting ahead of the device work
  # Faces per device in the batched device programs (sweep, fit, rasterisation, texture sampling): a batch holds
  # face_batch x local devices faces, the last one padded. 0 = one face at a time through `cis_face`.
  config.cms.face_batch = 8
  # A CSV of true labels, rows `path_or_basename,label` (paths relative to the CSV's folder): adds the groups
  # "label_<label>", and "correct" / "misclassified" (prediction equal to the label, case-insensitive). "" = none.
  config.cms.labels_csv = ""
  # Also keep each accumulated image's CIS texture and weight as textures/<index>.npz (for texel-level
  # permutation tests and report examples; ~T*T*8 bytes per image before compression).
  config.cms.save_textures = False

  # Figures (overlay.png, cis.png, pair.png, cms_<group>.png; `canonsal_jax.viz`): one colour scale per figure
  # with a colour bar naming the unit, labelled panels, a key for no data.
  config.figures = ml_collections.ConfigDict()
  config.figures.dpi = 150  # dots per inch (png; the pixel size of maps embedded in svg/pdf)
  config.figures.format = "png"  # "png", or vector "svg" / "pdf" (the same names with that suffix)
  return config
