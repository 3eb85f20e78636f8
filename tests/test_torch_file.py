"""The torch-free reader of `torch.save` files, checked against files real torch writes."""
import collections

import numpy as np
import pytest

from parti_jax.convert import torch_file

torch = pytest.importorskip("torch")


def _state_dict():
  g = torch.Generator().manual_seed(0)
  return collections.OrderedDict(
      weight=torch.randn(3, 4, generator=g),
      transposed=torch.randn(4, 3, generator=g).t(),  # non-contiguous strides
      sliced=torch.randn(10, generator=g)[2:7],  # storage offset
      counts=torch.arange(5),
      scalar=torch.tensor(2.5),
      half=torch.randn(2, 3, generator=g).half(),
      bf16=torch.randn(2, 2, generator=g).bfloat16(),
  )


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reads_what_torch_saves(tmp_path, legacy):
  sd = _state_dict()
  path = tmp_path / "w.pth"
  torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
  out = torch_file.load(path)
  assert list(out) == list(sd)
  for name, tensor in sd.items():
    expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    got = out[name].astype(np.float32) if tensor.dtype == torch.bfloat16 else out[name]
    assert got.shape == expected.shape and got.dtype == expected.dtype, name
    np.testing.assert_array_equal(got, expected)


def test_unwraps_checkpoint_dicts(tmp_path):
  path = tmp_path / "ckpt.pth"
  torch.save({"state_dict": _state_dict(), "epoch": 3}, path)
  assert "weight" in torch_file.load(path)


def test_refuses_pickled_objects_and_other_files(tmp_path):
  path = tmp_path / "module.pth"
  torch.save(torch.nn.Linear(2, 2), path)
  with pytest.raises(torch_file.TorchFileError, match="Linear"):
    torch_file.load(path)
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"\x80\x04K\x07.")  # a pickled 7, not a torch file
  with pytest.raises(torch_file.TorchFileError, match="not a PyTorch file"):
    torch_file.load(junk)


def test_a_file_zipped_again_with_deflate_still_reads(tmp_path):
  """The zip bounds refuse bombs, not compression: random weights shrink a little."""
  import zipfile
  sd = _state_dict()
  path = tmp_path / "w.pth"
  torch.save(sd, path)
  deflated = tmp_path / "deflated.pth"
  with zipfile.ZipFile(path) as source, zipfile.ZipFile(deflated, "w",
                                                        zipfile.ZIP_DEFLATED) as out:
    for info in source.infolist():
      out.writestr(info.filename, source.read(info))
  out = torch_file.load(deflated)
  np.testing.assert_array_equal(out["weight"], sd["weight"].numpy())


def test_refusals_name_the_file_and_run_nothing(tmp_path):
  """A legacy file whose header pickle calls os.system (what torch's own loader would run)."""
  import os
  import pickle

  marker = tmp_path / "marker"

  class Shell:
    def __reduce__(self):
      return os.system, (f"touch '{marker}'",)

  path = tmp_path / "evil.pth"
  path.write_bytes(pickle.dumps(Shell(), 2))
  with pytest.raises(torch_file.TorchFileError, match=r"evil\.pth: not a PyTorch file"):
    torch_file.load(path)
  assert not marker.exists()
