"""Sharded safetensors checkpoints: memory-mapped loading, dtype casting, atomic saving.

We parse the safetensors header ourselves (8-byte little-endian length + JSON) so that every way a
file can be broken -- truncated, a header that lies about offsets, a missing tensor -- is caught
before any byte is used, with the file and tensor named in the error. Tensors whose dtype already
matches are views of a private (copy-on-write) memory map: loading costs no read of the data and
the pages come in from the page cache only when a layer first runs. A cast (e.g. bf16 file ->
fp32 model) copies one tensor at a time and returns the mapped source pages right after, so peak
memory is the final model plus one tensor.

Only safetensors is ever read: a folder with pickle-based weights (.bin/.pt/.pth/.ckpt) is refused.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from glm4v.errors import CheckpointError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Names the official checkpoints carry that hold nothing the forward pass reads.
IGNORED_TENSORS = ("transformer.rotary_pos_emb.inv_freq",)


class SafetensorsFile:
    """One .safetensors file, validated and memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fd = open(self.path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open: {e}") from None
        try:
            self.size = os.fstat(self._fd.fileno()).st_size
            self.header, self.data_start = self._read_header()
            self._map = mmap.mmap(self._fd.fileno(), 0, access=mmap.ACCESS_COPY) if self.size else None
        except BaseException:
            self._fd.close()
            raise

    def _read_header(self):
        where = str(self.path)
        if self.size < 8:
            raise CheckpointError(f"{where}: file is {self.size} bytes, too short to be safetensors (truncated?)")
        (header_len,) = struct.unpack("<Q", self._fd.read(8))
        if header_len > _MAX_HEADER or 8 + header_len > self.size:
            raise CheckpointError(
                f"{where}: header claims {header_len} bytes but the file has {self.size} bytes "
                "(truncated or not a safetensors file)"
            )
        try:
            header = json.loads(self._fd.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{where}: header is not valid JSON ({e}); not a safetensors file?") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{where}: header is not a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        data_size = self.size - data_start
        for name, info in header.items():
            if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
                raise CheckpointError(f"{where}: tensor '{name}' has an unknown or missing dtype ({info!r:.80})")
            shape, offsets = info.get("shape"), info.get("data_offsets")
            if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
                raise CheckpointError(f"{where}: tensor '{name}' has an invalid shape {shape!r}")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
                raise CheckpointError(f"{where}: tensor '{name}' has invalid data_offsets {offsets!r}")
            begin, end = offsets
            numel = 1
            for s in shape:
                numel *= s
            expected = numel * _DTYPES[info["dtype"]].itemsize
            if begin < 0 or end < begin or end - begin != expected:
                raise CheckpointError(
                    f"{where}: tensor '{name}' header says bytes [{begin}, {end}) but shape {shape} "
                    f"{info['dtype']} needs {expected} bytes"
                )
            if end > data_size:
                raise CheckpointError(
                    f"{where}: tensor '{name}' ends at byte {data_start + end} but the file has only "
                    f"{self.size} bytes (truncated file)"
                )
        return header, data_start

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.header[name]["dtype"]]

    def _span(self, name: str) -> tuple[int, int]:
        begin, end = self.header[name]["data_offsets"]
        return self.data_start + begin, self.data_start + end

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as a view of the mapped file (copy-on-write); copied only if misaligned."""
        if name not in self.header:
            raise CheckpointError(f"{self.path}: no tensor named '{name}'")
        dtype, shape = self.dtype(name), self.shape(name)
        begin, end = self._span(name)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        if begin % dtype.itemsize == 0:
            flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin)
        else:
            flat = torch.frombuffer(bytearray(self._map[begin:end]), dtype=dtype)
        return flat.view(shape)

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor that was copied elsewhere (keeps peak RSS low)."""
        begin, end = self._span(name)
        page = mmap.PAGESIZE
        start, stop = (begin // page) * page, -(-end // page) * page
        if self._map is not None and stop > start and hasattr(self._map, "madvise"):
            try:
                self._map.madvise(mmap.MADV_DONTNEED, start, min(stop, self.size) - start)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self._fd.close()


def refuse_pickle_only(folder: Path) -> None:
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    has_safetensors = any(p.suffix == ".safetensors" for p in folder.iterdir())
    if pickled and not has_safetensors:
        raise CheckpointError(
            f"{folder}: holds only pickle-based weights ({', '.join(pickled[:3])}); glm4v reads safetensors only "
            "because unpickling a file can run arbitrary code. Convert the checkpoint to safetensors first."
        )


def checkpoint_files(folder: str | Path) -> dict[str, Path]:
    """Map every tensor name to the shard holding it, via model.safetensors.index.json or a single file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory (expected a GLM-4V model folder)")
    refuse_pickle_only(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = {}
        for name, shard in weight_map.items():
            path = folder / shard
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise CheckpointError(f"{index}: tensor '{name}' points to an invalid shard name {shard!r}")
            if not path.exists():
                raise CheckpointError(f"{index}: tensor '{name}' is in shard '{shard}', which does not exist in {folder}")
            files[name] = path
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return {name: single for name in SafetensorsFile(single).keys()}
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        raise CheckpointError(
            f"{folder}: has {len(shards)} .safetensors file(s) but no model.safetensors.index.json and no model.safetensors"
        )
    raise CheckpointError(f"{folder}: no weights found (expected model.safetensors.index.json + shards or model.safetensors)")


TensorHook = Callable[[str, torch.Tensor, nn.Module, str], bool]


def load_weights(
    model: nn.Module,
    folder: str | Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    on_tensor: TensorHook | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Fill ``model`` (built on the meta device) with the checkpoint's tensors.

    ``on_tensor(name, tensor, module, attr)`` may take over a tensor (e.g. quantise a linear
    weight) and return True; otherwise the tensor is cast to ``dtype`` and set as the parameter.
    """
    device = torch.device(device)
    files = checkpoint_files(folder)
    expected = dict(model.named_parameters())
    expected.update({k: v for k, v in model.named_buffers() if k in _persistent_buffer_names(model)})

    missing = [n for n in expected if n not in files and n not in IGNORED_TENSORS]
    if missing:
        raise CheckpointError(
            f"{folder}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {', '.join(missing[:4])}"
        )
    unexpected = [n for n in files if n not in expected and n not in IGNORED_TENSORS]
    if unexpected:
        raise CheckpointError(
            f"{folder}: {len(unexpected)} unexpected tensor(s) (does config.json match the weights?), "
            f"e.g. {', '.join(unexpected[:4])}"
        )

    opened: dict[Path, SafetensorsFile] = {}
    try:
        for path in sorted(set(files.values())):
            opened[path] = SafetensorsFile(path)
        for name, path in files.items():
            if name not in opened[path].header:
                raise CheckpointError(f"{path}: the index puts tensor '{name}' in this shard but it is not there")
        names = [n for n in expected if n in files]
        for done, name in enumerate(names, 1):
            shard = opened[files[name]]
            found, want = shard.shape(name), tuple(expected[name].shape)
            if found != want:
                raise CheckpointError(
                    f"{shard.path}: tensor '{name}' has shape {list(found)}, the config expects {list(want)}"
                )
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            source = shard.tensor(name)
            if on_tensor is not None and on_tensor(name, source, module, attr):
                shard.release(name)
            else:
                target_dtype = dtype if source.is_floating_point() else source.dtype
                zero_copy = source.dtype == target_dtype and device.type == "cpu"
                value = source if zero_copy else source.to(device=device, dtype=target_dtype)
                if not zero_copy:
                    shard.release(name)
                _assign(module, attr, value)
            if progress:
                progress(done, len(names))
    finally:
        # Zero-copy tensors keep their maps alive through the buffer protocol; closing the file
        # descriptors is safe because mmap holds its own reference to the file.
        for f in opened.values():
            f.close()


def _persistent_buffer_names(model: nn.Module) -> set[str]:
    return set(model.state_dict().keys()) - {n for n, _ in model.named_parameters()}


def _assign(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def save_weights(
    tensors: dict[str, torch.Tensor],
    folder: str | Path,
    max_shard_bytes: int = 5 * 1024**3,
    metadata: dict | None = None,
) -> list[str]:
    """Write tensors in the official layout (model-0000i-of-0000N.safetensors + index).

    Shards are filled in the order given; a single shard is still indexed, as the official repos do.
    Returns the shard file names. The caller makes the folder swap atomic (see ``atomic_folder``).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().contiguous().cpu()
        size += nbytes
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for shard_name, shard in zip(names, shards):
        save_file(shard, str(folder / shard_name), metadata={"format": "pt", **(metadata or {})})
        for k, t in shard.items():
            weight_map[k] = shard_name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


class atomic_folder:
    """Write a folder under a temporary name and swap it in only when complete.

    A crash or kill at any moment leaves either the previous complete folder or the new one,
    never a half-written one (rename is atomic within a filesystem).
    """

    def __init__(self, target: str | Path):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        for p in self.tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.rename(self.target, old)
        os.rename(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def copy_files(names: Iterable[str], src: Path, dst: Path) -> None:
    for name in names:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
