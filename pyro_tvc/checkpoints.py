"""Checkpoint readers: the weights people really have, read without running code from the file.

Formats read (:func:`read_checkpoint`):

* safetensors files (any name; a truncated or corrupt file is refused with one line);
* ``torch.save`` files of plain state dicts and of wrapped ones (``{"state_dict": ...}``, ``{"model": ...,
  "optimizer": ..., "epoch": 3}``, ...), read with ``weights_only=True``;
* **whole pickled modules** as the task_vectors / aTLAS repositories publish them (``src.modeling.ImageEncoder``
  holding an open_clip model, old open_clip classes such as ``open_clip.model.VisualTransformer``, torchvision
  transforms). A restricted unpickler rebuilds the tensors and maps every class of a known namespace
  (:data:`LEGACY_NAMESPACES`) to an inert stand-in that only stores its state: nothing is imported from those
  modules, no ``__setstate__``/``__reduce__`` of theirs runs. Any other global (e.g. ``os.system``) is refused with
  one line naming it; only ``allow_pickle=True`` (``--allow-pickle``) then unpickles the file for real;
* OpenAI's original CLIP files (TorchScript archives), read with ``torch.jit.load`` and ``state_dict()`` as
  open_clip does (TorchScript deserialisation compiles TorchScript, it does not run Python from the file).

:func:`state_dict_from` then unwraps the common layouts (see :data:`WRAPPER_KEYS`, :data:`STRIP_PREFIXES`) and
:func:`image_encoder_state` picks the image tower (a ``visual.`` sub-tree at any depth, e.g. ``model.visual.``).
Every refusal is a :class:`CheckpointError` (a ``ValueError``) whose message is one line naming the file.
"""
from __future__ import annotations

import _compat_pickle
import pickle
import types
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from pyro_tvc.task_vectors import TaskVectorError

#: Module namespaces whose classes are rebuilt as inert stand-ins (state only, no code of theirs runs).
LEGACY_NAMESPACES = ("open_clip.", "src.", "clip.", "torch.nn.modules.", "torchvision.transforms.", "PIL.Image")
#: Keys under which checkpoints wrap their state dict or module, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
#: Key prefixes added by DistributedDataParallel (``module.``) and ``torch.compile`` (``_orig_mod.``).
STRIP_PREFIXES = ("module.", "_orig_mod.")
#: Entries of OpenAI's TorchScript CLIP that are not parameters of open_clip's model (open_clip drops them too).
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

ACCEPTED_LAYOUTS = ("a state dict of tensors; a dict wrapping one under " + "/".join(repr(k) for k in WRAPPER_KEYS)
                    + "; keys optionally prefixed 'module.'/'_orig_mod.'; a pickled module (open_clip, task_vectors"
                    " 'src.modeling'); safetensors; OpenAI TorchScript CLIP")


class CheckpointError(TaskVectorError):
    """A checkpoint that cannot be read or holds no usable weights; the message names the file and what was found."""


class UnsafeGlobalError(pickle.UnpicklingError):
    """The pickle names a global outside the restricted unpickler's allowlist (it would run code to rebuild it)."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


# --- inert stand-ins for legacy classes ---------------------------------------------------------------------------

class LegacyObject:
    """Stand-in for a class named in a pickle: stores constructor arguments and state, runs nothing else.

    ``pickled_name`` is the ``module.qualname`` the file asked for. Modules pickled by ``torch.nn.Module`` keep
    ``_parameters``, ``_buffers`` and ``_modules`` in their state, which :func:`module_state_dict` walks.
    """

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args
        self.__dict__.update({k: v for k, v in kwargs.items() if isinstance(k, str)})

    def __setstate__(self, state):
        # pickle's own rules: a dict of attributes, or (dict, slot dict); anything else is kept as is.
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:
                self.__dict__.update(part or {})
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    # list/dict subclasses are filled with APPENDS/SETITEMS after construction
    def append(self, item):
        self.__dict__.setdefault("_list", []).append(item)

    def extend(self, items):
        self.__dict__.setdefault("_list", []).extend(items)

    def __setitem__(self, key, value):
        self.__dict__.setdefault("_items", {})[key] = value

    def __repr__(self) -> str:
        return f"<stand-in for {self.pickled_name}>"


def _stand_in(full_name: str) -> type:
    return type(full_name.rsplit(".", 1)[-1], (LegacyObject,), {"pickled_name": full_name})


def _safe_reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (pickle protocols 0/1), restricted to stand-ins."""
    if not (isinstance(cls, type) and issubclass(cls, LegacyObject)):
        raise UnsafeGlobalError("copyreg", f"_reconstructor({getattr(cls, '__qualname__', cls)})")
    obj = cls.__new__(cls)
    if state is not None:
        obj.__setstate__(state)
    return obj


def _allowed_globals() -> dict[str, Any]:
    # torch's own weights_only allowlist: tensor/parameter rebuild functions, storages, dtypes, OrderedDict, set
    from torch._weights_only_unpickler import _get_allowed_globals

    return {**_get_allowed_globals(), "builtins.frozenset": frozenset, "builtins.slice": slice,
            "copyreg._reconstructor": _safe_reconstructor}


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors and inert stand-ins; refuses every other global with :class:`UnsafeGlobalError`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._allowed = _allowed_globals()
        self._stand_ins: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        # pickle protocol 2 writes Python 2 names (``__builtin__``); map them as pickle itself does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if any(full.startswith(ns) for ns in LEGACY_NAMESPACES):
            return self._stand_ins.setdefault(full, _stand_in(full))
        raise UnsafeGlobalError(module, name)


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


#: A "pickle module" for ``torch.load(..., pickle_module=...)``: torch reads the zip and storages, we the objects.
RESTRICTED_PICKLE = types.SimpleNamespace(__name__="pyro_tvc_restricted_pickle", Unpickler=RestrictedUnpickler,
                                          load=_restricted_load, UnpicklingError=pickle.UnpicklingError)


# --- reading files --------------------------------------------------------------------------------------------------

def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"
                                             and int.from_bytes(head[:8], "little") < 100_000_000)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> Any:
    """The object stored in ``path``, read without running code from it (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable (truncated, corrupt, not a checkpoint), or a pickle naming a global outside the
            allowlist while ``allow_pickle`` is false (the message names ``module.class`` and what to do).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path}: is a folder, expected a checkpoint file (.pt, .bin, .safetensors)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (an interrupted download?)")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for corrupt headers/data
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt download?): "
                                  f"{_first_line(err)}") from err
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; OpenAI's files are jit
                return OrderedDict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as err:  # noqa: BLE001 - TorchScript raises RuntimeError subclasses with C++ traces
            raise CheckpointError(f"{path}: a TorchScript archive that torch.jit.load cannot read: "
                                  f"{_first_line(err)}") from err
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols other than 2 (it reads them); not a user's concern
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # holds objects beyond tensors and containers: try the restricted unpickler
    except Exception as err:  # noqa: BLE001 - zip reader and pickle raise RuntimeError/EOFError/... on bad bytes
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated download or not a torch/safetensors "
                              f"file): {_first_line(err)}") from err
    try:
        with warnings.catch_warnings():
            # pre-1.6 files store module sources that torch compares with the (absent) classes: not a concern here
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=RESTRICTED_PICKLE)
    except UnsafeGlobalError as err:
        if allow_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        raise CheckpointError(
            f"{path}: refusing to unpickle {err.name!r} from module {err.module!r}: it is not a tensor container "
            f"pyro-tvc knows, and rebuilding it would run code from the file. Convert the file to a state dict "
            f"(torch.save(model.state_dict(), ...)) or, if you trust it, pass --allow-pickle") from err
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated download or not a torch/safetensors "
                              f"file): {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


# --- from objects to state dicts ------------------------------------------------------------------------------------

def _is_module_like(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module) or (isinstance(obj, LegacyObject)
                                                and isinstance(obj.__dict__.get("_parameters"), Mapping))


def module_state_dict(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """State dict of a real module or of a stand-in of one: parameters and persistent buffers, recursively."""
    if isinstance(obj, torch.nn.Module):
        return {prefix + k: v for k, v in obj.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    attrs = obj.__dict__

    def mapping(key: str) -> Mapping:  # the file decides what these attributes hold: trust only real mappings
        value = attrs.get(key)
        return value if isinstance(value, Mapping) else {}

    for name, p in mapping("_parameters").items():
        if isinstance(p, torch.Tensor):
            out[f"{prefix}{name}"] = p.detach()
    skip = attrs.get("_non_persistent_buffers_set")
    skip = skip if isinstance(skip, (set, frozenset)) else set()
    for name, b in mapping("_buffers").items():
        if isinstance(b, torch.Tensor) and name not in skip:
            out[f"{prefix}{name}"] = b.detach()
    for name, child in mapping("_modules").items():
        if _is_module_like(child) and len(prefix) < 1000:  # a self-referencing module tree ends here
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.``/``_orig_mod.`` while every key carries it (in any order and nesting)."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for p in STRIP_PREFIXES:
            if all(k.startswith(p) for k in state):
                state = {k[len(p):]: v for k, v in state.items()}
                changed = True
    return state


def _describe(obj: Any) -> str:
    if isinstance(obj, LegacyObject):
        return f"an object of {obj.pickled_name} with attributes {sorted(k for k in obj.__dict__ if k[:1] != '_')[:8]}"
    if isinstance(obj, Mapping):
        return f"a {type(obj).__name__} with top-level keys {[str(k) for k in list(obj)[:10]]}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def state_dict_from(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Unwrap ``obj`` (as returned by :func:`read_checkpoint`) to a flat ``{name: tensor}`` state dict.

    Raises:
        CheckpointError: no layout of :data:`ACCEPTED_LAYOUTS` fits; the message lists the keys found.
    """
    found = _unwrap(obj, depth=0)
    if found is None:
        raise CheckpointError(f"{where}: no state dict found in {_describe(obj)}; accepted layouts: {ACCEPTED_LAYOUTS}")
    return strip_prefixes(found)


def _unwrap(obj: Any, depth: int) -> dict[str, torch.Tensor] | None:
    if depth > 4:
        return None
    if _is_module_like(obj):
        return module_state_dict(obj) or None
    if isinstance(obj, Mapping) and obj:
        if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        for key in WRAPPER_KEYS:
            if key in obj:
                inner = _unwrap(obj[key], depth + 1)
                if inner is not None:
                    return inner
    return None


def image_encoder_state(state: Mapping[str, torch.Tensor],
                        reference_keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The image tower of ``state``: a ``visual.`` sub-tree at any depth (``visual.``, ``model.visual.``, ...).

    With ``reference_keys`` (theta_0's names) the sub-tree whose names equal them wins, the whole dict included
    (a bare image-encoder state dict); otherwise the shallowest ``visual.`` sub-tree, or the whole dict if none.
    """
    prefixes = sorted({k[:i + len("visual.")] for k in state for i in _visual_positions(k)}, key=len)
    candidates = [{k[len(p):]: v for k, v in state.items() if k.startswith(p)} for p in prefixes]
    if reference_keys is not None:
        for cand in [dict(state), *candidates]:
            if set(cand) == set(reference_keys):
                return cand
    return candidates[0] if candidates else dict(state)


def _visual_positions(key: str):
    start = key.find("visual.")
    while start >= 0:
        if start == 0 or key[start - 1] == ".":
            yield start
        start = key.find("visual.", start + 1)


def clip_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A whole CLIP's state dict from any readable checkpoint (OpenAI's non-parameter entries dropped)."""
    state = state_dict_from(read_checkpoint(path, allow_pickle), str(path))
    return {k: v for k, v in state.items() if k not in OPENAI_EXTRA_KEYS}


def load_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """``state_dict_from(read_checkpoint(path))``: a flat state dict from any readable checkpoint."""
    return state_dict_from(read_checkpoint(path, allow_pickle), str(path))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed (a ViT-B/32 checkpoint is ~350 MB)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- the import-vector command ----------------------------------------------------------------------------------

def import_task_vector(finetuned_path: str | Path, artifacts_dir: str | Path, task: str,
                       allow_pickle: bool = False) -> Path:
    """``tau = fine-tuned image encoder - theta_0`` from a user's checkpoint, saved as ``task_vectors/<task>``.

    Reads ``finetuned_path`` (:func:`read_checkpoint`: no code from the file runs unless ``allow_pickle``),
    unwraps it, picks the image tower whose names match theta_0's (``clip.safetensors`` in ``artifacts_dir``),
    casts floating-point weights to theta_0's dtype (OpenAI's files are float16), refuses NaN/inf, subtracts
    theta_0 and writes the vector atomically with metadata (task, backbone, theta_0 sha256, the file's sha256).
    Returns the path of the written vector.

    Raises:
        FileNotFoundError: the checkpoint or ``clip.safetensors`` is missing.
        CheckpointError / TaskVectorError / NonFiniteError (ValueErrors): unreadable file, no image encoder in it,
            keys or shapes that do not fit theta_0 (another backbone), non-finite weights, a bad task name.
    """
    from pyro_tvc.artifacts import ArtifactPaths, load_clip
    from pyro_tvc.backbones import image_encoder
    from pyro_tvc.task_vectors import TaskVector, check_finite, check_task_name

    check_task_name(task)
    finetuned_path = Path(finetuned_path)
    if not finetuned_path.is_file():
        raise FileNotFoundError(f"fine-tuned checkpoint not found: {finetuned_path}")
    paths = ArtifactPaths(Path(artifacts_dir))
    model, name = load_clip(paths.clip)
    theta0 = {k: v.detach() for k, v in image_encoder(model).state_dict().items()}
    state = load_state_dict(finetuned_path, allow_pickle)
    encoder = image_encoder_state(state, reference_keys=set(theta0))
    _check_fits(encoder, theta0, finetuned_path, name)
    finetuned = {k: v.to(theta0[k].dtype) if v.is_floating_point() else v for k, v in encoder.items()}
    check_finite(finetuned, f"{finetuned_path} (task {task!r})")
    vector = TaskVector.from_state_dicts(theta0, finetuned, task=task, backbone=name)
    vector = TaskVector(vector.params, {**vector.meta, "source_sha256": file_sha256(finetuned_path),
                                        "recipe": '{"kind": "import"}'})
    out = paths.task_vector(task)
    vector.save(out)
    return out


def _check_fits(encoder: Mapping[str, torch.Tensor], theta0: Mapping[str, torch.Tensor], path: Path,
                backbone: str) -> None:
    """One line saying why the checkpoint's image tower is not theta_0's architecture."""
    missing, extra = sorted(set(theta0) - set(encoder)), sorted(set(encoder) - set(theta0))
    if missing or extra:
        raise CheckpointError(
            f"{path}: its image encoder does not have theta_0's ({backbone}) parameters: missing {missing[:3]}, "
            f"unexpected {extra[:3]} ({len(missing)} missing, {len(extra)} unexpected; another backbone?)")
    for k, v in theta0.items():
        if encoder[k].shape != v.shape:
            raise CheckpointError(f"{path}: shape of {k!r} is {tuple(encoder[k].shape)}, theta_0 ({backbone}) has "
                                  f"{tuple(v.shape)}: fine-tuned from another backbone?")
        if encoder[k].is_floating_point() != v.is_floating_point():
            raise CheckpointError(f"{path}: dtype of {k!r} is {encoder[k].dtype}, theta_0 has {v.dtype}")
