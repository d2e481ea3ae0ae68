"""Checkpoint validation: bad input is refused before it is read, allocated or run.

What `weights.load_model` checks, in this order (each failure is one `CheckpointError` line):

1. Paths (`contained`): every file edge-dlm opens in a model directory — config.json, tokenizer
   files, weights, shards named by the index, the LoRA drafter — must resolve (symlinks followed)
   inside that directory. A Hub cache snapshot may point into its repository's `blobs/` (that is
   the cache's layout), nothing further. Index entries must be plain relative file names.
2. Config sanity (`NLDConfig.validate`): positive sizes, heads dividing, ids inside the vocabulary.
3. Memory (`check_memory`): the weights the config implies must fit the device (numbers in the error).
4. Headers (`check_headers`): each tensor's dtype and shape from the safetensors header, before any
   data is read: floating point everywhere, integers only for a quantized format's packed weights.
5. Values (`check_finite`): no NaN or infinity in any floating tensor, once read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from edge_dlm.primitives.errors import CheckpointError
from edge_dlm.primitives.inputs import kind_of, os_error

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# integer tensors of quantized formats: edge-dlm's `.qweight` (U8/I8), compressed-tensors' and GPTQ's
# int32 words, shapes and group indices
PACKED_DTYPES = {"U8", "I8", "I32", "I64"}
INT_SUFFIXES = (".qweight", ".weight_packed", ".weight_zero_point", ".weight_shape", ".qzeros", ".g_idx")
HEADROOM = 0.9  # of the memory the weights may take


def allowed_roots(path: Path) -> list[Path]:
    """Where files of model directory `path` may live: itself, and for a Hub cache snapshot
    (`models--ORG--NAME/snapshots/REV`) the repository's `blobs/` its symlinks point into."""
    root = path.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        roots.append(root.parent.parent / "blobs")
    return roots


def contained(path: Path, name: str, what: str = "file") -> Path:
    """`path / name`, refused when `name` is absolute, climbs with `..`, or resolves outside `path`."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{path} names an invalid {what} {name!r}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{path} names {what} {name!r} outside the model directory; refused")
    try:
        target = (path / rel).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise CheckpointError(f"{path / name} is a symlink loop; refused") from None
    if not any(target == r or r in target.parents for r in allowed_roots(path)):
        raise CheckpointError(f"{path / name} is a link to {target}, outside the model directory; refused")
    return path / rel


def regular_file(p: Path, what: str = "file") -> Path:
    """`p` itself when it is a regular file (symlinks followed); a FIFO, device, directory, loop or
    unreadable path is one line naming it."""
    try:
        mode = os.stat(p).st_mode
    except OSError as exc:
        raise CheckpointError(os_error(p, exc, what)) from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{what} {p} is {kind_of(mode)}; expected a regular file")
    if not os.access(p, os.R_OK):
        raise CheckpointError(f"cannot read {what} {p}: permission denied")
    return p


def check_files(path: Path, names: list[str], directories: tuple[str, ...] = ()) -> None:
    """Every listed file that exists in `path` (and each file under a listed folder) stays inside it and
    is a readable regular file; the model directory itself must be readable."""
    if not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(f"cannot read model directory {path}: permission denied")
    for name in names:
        p = path / name
        if p.is_symlink() or p.exists():
            contained(path, name)
            if name in directories:
                if not p.is_dir():
                    raise CheckpointError(f"{p} should be a directory")
            else:
                regular_file(p, name)
        if p.is_dir() and name in directories:
            for sub in sorted(p.rglob("*")):
                contained(path, str(sub.relative_to(path)))
                if not sub.is_dir():
                    regular_file(sub, str(sub.relative_to(path)))


def physical_memory(device: torch.device | str) -> int | None:
    """Bytes the weights can use on `device`: free GPU memory, or this machine's memory."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device | str) -> None:
    """Refuse weights that cannot fit before anything is read or allocated (packed weights: 1 byte)."""
    elem = torch.empty((), dtype=dtype).element_size()
    check_bytes(sum(_numel(s) * (1 if n.endswith(".qweight") else elem) for n, s in shapes.items()), dtype, device)


def check_bytes(need: int, dtype: torch.dtype, device: torch.device | str) -> None:
    """Refuse `need` bytes of weights that cannot fit this device."""
    have = physical_memory(device)
    if have is not None and need > HEADROOM * have:
        raise CheckpointError(f"the config implies {need / 2**30:.1f} GiB of {str(dtype).removeprefix('torch.')} "
                              f"weights, more than this device's {have / 2**30:.1f} GiB; "
                              "check vocab_size / hidden_size / num_hidden_layers in config.json")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_headers(files: dict[str, Path], shapes: dict[str, tuple[int, ...]], quantized: bool) -> None:
    """Dtype and shape of every expected tensor, read from the safetensors headers (no data read)."""
    from safetensors import SafetensorError, safe_open

    by_file: dict[Path, list[str]] = {}
    for n in shapes:
        by_file.setdefault(files[n], []).append(n)
    for f, names in by_file.items():
        try:
            with safe_open(f, framework="pt") as st:
                for n in names:
                    sl = st.get_slice(n)
                    dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
                    packed = quantized and n.endswith(INT_SUFFIXES)
                    allowed = PACKED_DTYPES if packed else FLOAT_DTYPES
                    if dtype not in allowed:
                        kind = "packed integers" if packed else "floating point"
                        raise CheckpointError(f"tensor {n} is stored as {dtype}, expected {kind}; "
                                              "the checkpoint is malformed")
                    if shape != shapes[n]:
                        raise CheckpointError(f"tensor {n} has shape {list(shape)}, expected "
                                              f"{list(shapes[n])} from config.json")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read the header of {f.name} ({exc}); the file may be truncated") from None


def check_finite(tensors: dict[str, torch.Tensor], where: str = "") -> None:
    """No NaN or infinity in any floating tensor (checked in chunks: no full-size temporary)."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        flat = t.reshape(-1)
        for chunk in flat.split(1 << 24):
            if not torch.isfinite(chunk).all():
                raise CheckpointError(f"tensor {name}{where} holds NaN or infinite values; the checkpoint is corrupt")
