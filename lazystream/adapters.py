"""What differs between transformers and diffusers: how the model class is named in
the config, how its skeleton is built, which modules are its repeated blocks, and
which dtype each loaded tensor gets. The streamer knows none of this."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import BlocksNotFoundError, CheckpointNotFoundError, UnknownModelClassError
from .header import TensorRecord


@dataclass(frozen=True)
class ModelFamily:
    """Library rules for one model class."""

    library: str  # "transformers", "diffusers" or "torch"
    keep_fp32: tuple[str, ...]  # module name patterns that stay float32 at the requested dtype
    # transformers keeps a parameter its class declares in another floating dtype (fp32
    # router gates, say); these are the declarations of a skeleton built by build_skeleton.
    declared: dict[str, torch.dtype] = field(default_factory=dict)

    def target_dtype(self, name: str, stored: torch.dtype, dtype: torch.dtype) -> torch.dtype:
        """The dtype the library's own loader gives the tensor ``name`` stored as ``stored``."""
        if not stored.is_floating_point:
            return stored
        declared = self.declared.get(name)
        if self.library == "diffusers" and declared is not None and declared.is_floating_point:
            return declared  # what diffusers' own loader assigned (see _diffusers_dtype_plan)
        if self.library == "diffusers":  # a model built elsewhere (attach): diffusers' rule, mirrored
            keep = any(p in name.split(".") for p in self.keep_fp32)
        else:
            keep = any(p in name for p in self.keep_fp32)
        if keep:
            return torch.float32
        if self.library == "transformers" and declared is not None and declared.is_floating_point:
            return declared
        return dtype


def require_config(config: dict | None, folder: Path) -> dict:
    if config is None:
        raise CheckpointNotFoundError(
            f"{folder} has no config.json; lazystream builds the model from it (build the model yourself "
            "and use lazystream.attach to stream weights without one)",
            path=folder / "config.json",
        )
    return config


def model_class(config: dict, path: Path) -> type[nn.Module]:
    """The class a transformers (``architectures``) or diffusers (``_class_name``) config names."""
    if "_class_name" in config:
        import diffusers

        name = config["_class_name"]
        cls = getattr(diffusers, name, None)
    else:
        import transformers

        names = config.get("architectures") or []
        name = names[0] if names else None
        cls = getattr(transformers, name, None) if name else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UnknownModelClassError(
            f"{path}: the config names model class {name!r}, which neither transformers nor diffusers "
            "(as installed) provides; upgrade them, or pass model_cls=",
            path=path,
        )
    return cls


def family_of(model: nn.Module, dtype: torch.dtype, *, built_here: bool = False) -> ModelFamily:
    """The rules of the library ``model``'s class (or, for a user's subclass, its base) comes from.

    ``built_here``: the model is a skeleton from build_skeleton at ``dtype``, so each
    parameter's dtype is the one its library declares.
    """
    library = library_of(model)
    keep: list[str] = []
    if library == "diffusers":
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or [])
        if built_here:
            return ModelFamily(library, tuple(keep), _diffusers_dtype_plan(model, dtype))
    declared = {name: p.dtype for name, p in model.named_parameters(remove_duplicate=False)} if built_here else {}
    if library == "transformers":
        declared.update(_transformers_dtype_plan(model, dtype))
    return ModelFamily(library, tuple(keep), declared)


def _diffusers_dtype_plan(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Each parameter's dtype as diffusers' own ``load_model_dict_into_meta`` assigns it when
    ``ModelMixin.from_pretrained`` loads at ``dtype`` (its keep-in-fp32 matching included),
    run on data-less tensors of a skeleton built here (on the meta device, so its parameters
    are replaced by meta ones in the assigned dtypes, as the library's load replaces them)."""
    from diffusers.models.model_loading_utils import load_model_dict_into_meta

    # The list ModelMixin.from_pretrained passes (without a quantizer): the class's, as a list.
    keep = type(model)._keep_in_fp32_modules
    keep = ([] if keep is None else keep if isinstance(keep, list) else [keep])
    params = dict(model.named_parameters())
    if any(p.device.type != "meta" for p in params.values()):
        raise ValueError("_diffusers_dtype_plan runs on a skeleton built on the meta device")
    state = {name: torch.empty(p.shape, dtype=p.dtype, device="meta") for name, p in params.items()}
    load_model_dict_into_meta(model, state, dtype=dtype, keep_in_fp32_modules=keep, device_map={"": "meta"})
    return {name: p.dtype for name, p in model.named_parameters(remove_duplicate=False)}


def _transformers_dtype_plan(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The parameters transformers' loader gives another dtype than ``dtype`` (its keep-in-fp32
    rules), by the model's own ``_get_dtype_plan`` matched as the loader matches it."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return {}
    from transformers.core_model_loading import build_glob_alternation

    alternation, by_group, _ = build_glob_alternation(list(plan))
    forced = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        match = alternation.search(name)
        if match is not None:
            forced[name] = plan[by_group[match.lastgroup]]
    return forced


def library_dtype(library: str, dtype, config: Mapping | None, records: Mapping[str, TensorRecord],
                  metadata: Mapping | None = None) -> torch.dtype:
    """The dtype ``library``'s from_pretrained resolves ``dtype`` (None: its default) to for
    the checkpoint of ``records``: transformers by its own ``_get_dtype`` ("auto", strings,
    dicts), from the config, the index's ``metadata`` (default: the index of ``records``
    where it is a Checkpoint) and the first weights file's headers; diffusers a torch.dtype
    as given, else its default."""
    if library == "transformers" and config and "model_type" in config:
        import transformers
        from transformers.modeling_utils import _get_dtype

        cfg = transformers.AutoConfig.for_model(config["model_type"]).__class__.from_dict(dict(config))
        if metadata is None:
            index = getattr(getattr(records, "files", None), "index", None)
            metadata = index_metadata(index.read_text()) if index is not None else None
        # The first weights file's tensors in its key order, as data-less tensors: what
        # transformers reads from it (on the meta device) to resolve "auto".
        first = min((rec.file for rec in records.values()), default=None, key=str)
        state = {name: torch.empty(records[name].shape, dtype=records[name].dtype, device="meta")
                 for name in sorted(records) if records[name].file == first}
        metadata = dict(metadata) if metadata is not None else None
        return _get_dtype("auto" if dtype is None else dtype, None, cfg, metadata, state, True)[1]
    if isinstance(dtype, torch.dtype):
        return dtype
    return default_dtype(library, config, records)


def index_metadata(text: str) -> dict:
    """The ``metadata`` of a safetensors index (as transformers reads it: sharded_metadata)."""
    import json

    return dict(json.loads(text).get("metadata") or {})


def library_of(model: nn.Module | type[nn.Module]) -> str:
    """"transformers" or "diffusers" (the library ``model``'s class or a base comes from), else "torch"."""
    cls = model if isinstance(model, type) else type(model)
    libraries = (base.__module__.split(".")[0] for base in cls.__mro__)
    return next((lib for lib in libraries if lib in ("transformers", "diffusers")), "torch")


def default_dtype(library: str, config: Mapping | None, records: Mapping[str, TensorRecord]) -> torch.dtype:
    """The dtype the library's own loader gives a model loaded without ``dtype=``.

    transformers (``dtype="auto"``): the config's ``dtype`` (or ``torch_dtype``), else the
    first floating dtype, other than float8, of the first weights file in key order.
    diffusers: torch's default dtype (float32): it builds the model in it and casts each
    loaded tensor to its parameter's dtype. Anything else: the floating dtype holding the
    most bytes (float32 if none, or if that is a float8 the model cannot be built in).
    """
    if library == "diffusers":
        return torch.get_default_dtype()
    if library == "transformers":
        named = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
        if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
            return getattr(torch, named)
        first_file = min((rec.file for rec in records.values()), default=None, key=str)
        for name in sorted(n for n, rec in records.items() if rec.file == first_file):
            if records[name].dtype.is_floating_point and not _is_float8(records[name].dtype):
                return records[name].dtype
        return torch.get_default_dtype()
    sizes: dict[torch.dtype, int] = {}
    for rec in records.values():
        if rec.dtype.is_floating_point and not _is_float8(rec.dtype):
            sizes[rec.dtype] = sizes.get(rec.dtype, 0) + rec.nbytes
    return max(sizes, key=sizes.get) if sizes else torch.float32


def _is_float8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def build_skeleton(cls: type[nn.Module], config: dict, dtype: torch.dtype,
                   overrides: Mapping | None = None) -> nn.Module:
    """Build ``cls`` from ``config`` as its library would at ``dtype``, parameters on meta.
    ``overrides``: keywords diffusers' from_pretrained passes to ``from_config``.

    Buffers are created for real (on the CPU), so non-persistent ones such as rotary
    ``inv_freq`` hold their computed values, as after the library's own loader.
    """
    with _parameters_on_meta(), _default_dtype(dtype):
        if hasattr(cls, "from_config") and hasattr(cls, "load_config"):  # diffusers ConfigMixin
            model = cls.from_config(config, **dict(overrides or {}))
        else:
            import transformers

            cfg_cls = transformers.AutoConfig.for_model(config["model_type"]).__class__
            cfg = cfg_cls.from_dict(config)
            model = cls._from_config(cfg, dtype=dtype) if hasattr(cls, "_from_config") else cls(cfg)
    return model.eval()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device; buffers stay real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def find_blocks(model: nn.Module, blocks: str | Sequence[str] | None = None) -> list[str]:
    """Qualified names of the repeated blocks, in registration order.

    ``blocks`` names module lists (each child a block) or single modules. Without it:
    the classes in ``_repeated_blocks`` / ``_no_split_modules``, else the largest
    ``nn.ModuleList`` whose children share one class.
    """
    modules = dict(model.named_modules())
    if blocks is not None:
        lists = [n for n, m in modules.items() if isinstance(m, (nn.ModuleList, nn.Sequential))]
        found: list[str] = []
        for path in [blocks] if isinstance(blocks, str) else list(blocks):
            module = modules.get(path)
            if module is None:
                raise BlocksNotFoundError(
                    f"blocks={path!r} names no module of {type(model).__name__}; its module lists are {lists}"
                )
            if isinstance(module, (nn.ModuleList, nn.Sequential)):
                found += [f"{path}.{child}" for child, _ in module.named_children()]
            elif isinstance(blocks, str):
                raise BlocksNotFoundError(
                    f"blocks={path!r} is a {type(module).__name__}, expected a module list whose children are "
                    f"the blocks (one of {lists}), or a list of block paths"
                )
            else:
                found.append(path)
        return found
    declared = _declared_blocks(model, modules)
    if declared and _share(modules, declared) >= COVER_SHARE:
        return declared
    covering = _covering_blocks(model, modules)
    if covering and _share(modules, covering) > _share(modules, declared) + 0.05:
        return covering
    if declared:
        return declared
    best: list[str] = []
    for name, module in modules.items():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                best = [f"{name}.{i}" for i in range(len(module))]
    if not best:
        raise BlocksNotFoundError(
            f"{type(model).__name__} has no repeated blocks lazystream can find (no _no_split_modules, "
            "no module list of like modules); pass blocks='path.to.module_list'"
        )
    return best


# Blocks are meant to hold at least this share of a model's parameter bytes: what stays
# outside them is resident whatever keep_gpu says.
COVER_SHARE = 0.9
# diffusers' UNet-style models register their parts in another order than they run them:
# the down path, the middle, the up path; inside each part, resnet i then attention i, and
# the sampler last. Registration order decides placement (which blocks stay resident).
_PART_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
_INTERLEAVED = {"resnets": 0, "attentions": 1}
_LAST = {"downsamplers", "upsamplers"}


def _declared_blocks(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """The outermost modules of the classes in ``_repeated_blocks`` / ``_no_split_modules``."""
    class_names = set(getattr(model, "_repeated_blocks", None) or []) or set(getattr(model, "_no_split_modules", None) or [])
    found: list[str] = []
    for name, module in modules.items():
        if type(module).__name__ in class_names and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _share(modules: dict[str, nn.Module], paths: Sequence[str]) -> float:
    total = _nbytes(modules[""])
    return sum(_nbytes(modules[p]) for p in paths) / total if total else 0.0


def _covering_blocks(model: nn.Module, modules: dict[str, nn.Module]) -> list[str]:
    """Blocks that hold most of the bytes where the declared ones hold little (a UNet's
    transformer blocks sit inside its down/mid/up blocks, beside the resnets).

    The outermost elements of module lists; an element whose own inner list elements hold
    COVER_SHARE of its bytes is replaced by them (a UNet down block by its resnets,
    attentions and sampler). In run order (see _PART_ORDER), not registration order.
    """
    def elements(root: str) -> list[str]:
        """The outermost module-list elements strictly inside ``root`` ("" for the model)."""
        found: list[str] = []
        for name, module in modules.items():
            inside = name.startswith(root + ".") if root else bool(name)
            if inside and isinstance(module, nn.ModuleList) and not any(name.startswith(f + ".") for f in found):
                found += [f"{name}.{child}" for child in module._modules]
        return found

    def refine(path: str) -> list[str]:
        inner = elements(path)
        total = _nbytes(modules[path])
        if inner and total and sum(_nbytes(modules[p]) for p in inner) >= COVER_SHARE * total:
            return [q for p in inner for q in refine(p)]
        return [path]

    blocks = [q for p in elements("") for q in refine(p)]
    blocks = [p for p in blocks if _nbytes(modules[p])]
    return sorted(blocks, key=lambda p: _run_order(model, p))


def _run_order(model: nn.Module, path: str) -> tuple:
    key, module, parts, i = [], model, path.split("."), 0
    while i < len(parts):
        name = parts[i]
        position = list(module._modules).index(name)
        module = module._modules[name]
        index = 0
        if isinstance(module, nn.ModuleList) and i + 1 < len(parts):
            index = list(module._modules).index(parts[i + 1])
            module = module._modules[parts[i + 1]]
            i += 1
        if name in _INTERLEAVED:
            key.append((1, index, _INTERLEAVED[name]))
        elif name in _LAST:
            key.append((2, index, position))
        else:
            key.append((1, _PART_ORDER.get(name, 3 + position), index))
        i += 1
    return tuple(key)


def match_prefix(model: nn.Module, records: Mapping[str, TensorRecord]) -> Mapping[str, TensorRecord]:
    """The records under the names ``model`` uses, adding or removing its
    ``base_model_prefix`` as transformers does: a checkpoint of ``Qwen3ForCausalLM``
    ("model.layers.0...") loads into ``Qwen3Model`` ("layers.0..."), and back."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return records
    expected = [name for name, _ in model.named_parameters()]
    model_has = any(n.startswith(prefix + ".") for n in expected)
    checkpoint_has = any(n.startswith(prefix + ".") for n in records)
    if checkpoint_has and not model_has:
        renamed = {n: n[len(prefix) + 1:] if n.startswith(prefix + ".") else n for n in records}
        return {renamed[n]: dataclasses.replace(r, name=renamed[n]) for n, r in records.items()}
    if model_has and not checkpoint_has:
        return {f"{prefix}.{n}": dataclasses.replace(r, name=f"{prefix}.{n}") for n, r in records.items()}
    return records
