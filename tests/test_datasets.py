"""Dataset lists keep a stable order; prefetching keeps item order, reports errors and honours skips."""

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

  out = list(datasets.prefetch(list(range(8)), work, num_threads=3, depth=4, skip={2}))
  assert [o.index for o in out] == [0, 1, 3, 4, 5, 6, 7]
  assert [o.value for o in out if o.error is None] == [0, 10, 30, 50, 60, 70]
  (bad,) = [o for o in out if o.error is not None]
  assert bad.index == 4 and "bad image 4" in str(bad.error)
  assert peak[0] >= 2  # items really were prepared concurrently
