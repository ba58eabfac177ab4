"""Write a (pruned) Hugging Face model back as a checkpoint that ``from_pretrained`` loads.

A transformers config describes every layer alike: one head count (and ``head_dim = hidden /
heads``), one FFN width. So a model whose FFN layers were all pruned to the same width is
described by a new ``intermediate_size`` (``n_inner`` for GPT-2, ...) and is written smaller,
while a model with heads removed, or with different widths per layer, has no config that builds
it: it is written in the original shapes with the removed heads and channels as zeros (the same
function; ``pad=False`` refuses instead, naming the layer). A pruned normalised width
(``prune_embedding``) can be neither, and is refused. GPT-2's ``Conv1D`` layers,
which slimline turns into ``nn.Linear`` for pruning, are stored back in their own layout. Every
checkpoint written is reloaded and compared with the model before the call returns.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimline.io import atomic_dir
from slimline.models.hf import quiet_transformers

__all__ = ["HFSaveError", "TOKENIZER_FILES", "save_hf_pretrained"]

# config fields that hold the FFN width, by the families that use them
FFN_WIDTH_FIELDS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim")
# projections that hold q, k and v in one weight (padding cannot append heads to them)
FUSED_QKV = ("c_attn", "query_key_value", "Wqkv", "qkv", "in_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json",
                   "sentencepiece.bpe.model", "spiece.model", "tokenizer.model")


class HFSaveError(ValueError):
    """The model cannot be written as a transformers checkpoint (the message says why)."""


def _fresh(model: nn.Module, config: Any) -> nn.Module:
    """The class's own module tree for ``config``, on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return type(model)(config)


def _conv1d_names(fresh: nn.Module) -> set[str]:
    return {name for name, m in fresh.named_modules() if type(m).__name__ == "Conv1D"}


def _shapes(model: nn.Module, conv1d: set[str]) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes in the class's own layout (Conv1D weights ``(in, out)``)."""
    linear = _linearised(model, conv1d)
    return {key: tuple(value.shape)[::-1] if key in linear else tuple(value.shape)
            for key, value in model.state_dict().items()}


def _linearised(model: nn.Module, conv1d: set[str]) -> set[str]:
    """Weights of the modules the class has as Conv1D and ``model`` as nn.Linear."""
    return {f"{name}.weight" for name, m in model.named_modules()
            if name in conv1d and isinstance(m, nn.Linear)}


def _mismatches(ours: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]]
                ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Keys both have whose shapes differ (keys only one has, e.g. a dropped pooler, are not
    shape questions: from_pretrained initialises or ignores them and says so)."""
    return {k: (ours[k], theirs[k]) for k in ours.keys() & theirs.keys() if ours[k] != theirs[k]}


def _config_for(model: nn.Module, conv1d: set[str], original: dict[str, tuple[int, ...]]
                ) -> Any:
    """A config that builds ``model``'s shapes, or HFSaveError naming what no config can say."""
    config = copy.deepcopy(model.config)
    ours = _shapes(model, conv1d)
    differ = _mismatches(ours, original)
    if not differ:
        return config
    heads = sorted({name for name, m in model.named_modules()
                    if getattr(m, "num_attention_heads", None) not in
                    (None, getattr(config, "num_attention_heads", None))})
    if heads:
        raise HFSaveError(
            f"attention heads were removed ({heads[0]} has "
            f"{model.get_submodule(heads[0]).num_attention_heads} of "
            f"{config.num_attention_heads}): a transformers config has one head count for "
            "every layer and derives the head size from it, so no config builds this model "
            "(prune with prune_heads: false for a smaller checkpoint).")
    widths = {n for (mine, full) in differ.values() for n, f in zip(mine, full) if n != f}
    for field in (f for f in FFN_WIDTH_FIELDS if hasattr(config, f)):
        if len(widths) != 1:
            break
        trial = copy.deepcopy(config)
        setattr(trial, field, next(iter(widths)))
        if not _mismatches(ours, _shapes(_fresh(model, trial), conv1d)):
            return trial
    key, (mine, full) = sorted(differ.items())[0]
    raise HFSaveError(
        f"{len(differ)} weights have shapes no {type(config).__name__} builds (e.g. {key}: "
        f"{list(mine)}, the config gives {list(full)}; widths seen {sorted(widths)}): only a "
        "model whose FFN layers all keep the same width can be described by one config "
        "(prune with allocation: uniform for a smaller checkpoint).")


def _state_dict(model: nn.Module, conv1d: set[str],
                pad_to: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """The class-layout state dict; tensors named in ``pad_to`` are zero-padded to that shape
    (kept values in the leading slice)."""
    linear = _linearised(model, conv1d)
    state = {}
    for key, value in model.state_dict().items():
        value = (value.t() if key in linear else value).detach()
        if pad_to and key in pad_to:
            padded = value.new_zeros(pad_to[key])
            padded[tuple(slice(0, n) for n in value.shape)] = value
            value = padded
        state[key] = value.contiguous().clone()
    return state


def _padding(model: nn.Module, conv1d: set[str], original: dict[str, tuple[int, ...]],
             refusal: HFSaveError) -> dict[str, tuple[int, ...]]:
    """Shapes that zero-padding restores to the original config, or ``refusal`` (extended)
    when padding would change the function.

    Appending zero rows to a projection and zero columns to its reader leaves every output
    unchanged: a zero FFN channel is act(0) = 0 for GELU/ReLU/SiLU, and a zero head has zero
    values (its uniform attention averages zeros). A normalised width (LayerNorm, the
    embeddings: ``prune_embedding``) is different: its statistics would include the zeros."""
    differ = _mismatches(_shapes(model, conv1d), original)
    for key, (mine, full) in sorted(differ.items()):
        name = key.rpartition(".")[0]
        module = model.get_submodule(name)
        why = None
        if isinstance(module, nn.LayerNorm | nn.Embedding) or "Norm" in type(module).__name__:
            why = "is a normalised width (zeros would enter its statistics)"
        elif name.rpartition(".")[2] in FUSED_QKV:
            why = "is a fused q/k/v projection (zeros appended at its end would land in v)"
        elif len(mine) != len(full) or any(a > b for a, b in zip(mine, full)):
            why = "is larger than or shaped unlike the original"
        if why:
            raise HFSaveError(f"{refusal} Nor can it be zero-padded back to the original "
                              f"shapes: {key} ({type(module).__name__}, {list(mine)} of "
                              f"{list(full)}) {why}") from None
    return {key: full for key, (_, full) in differ.items()}


def save_hf_pretrained(model: nn.Module, directory: str | os.PathLike, *,
                       source: str | os.PathLike | None = None,
                       check_inputs: torch.Tensor | None = None, atol: float = 1e-5,
                       pad: bool = True) -> dict[str, Any]:
    """Write the transformers model inside ``model`` (a slimline ``HFTextModel`` /
    ``HFVisionModel`` wrapper, or the transformers model itself) to ``directory`` with
    ``save_pretrained`` (safetensors); reload it with ``from_pretrained`` and compare outputs on
    ``check_inputs`` (token ids or pixel values; default: random ones of the config's vocabulary
    or image size). ``source``, the checkpoint directory the model was loaded from, gives the
    tokenizer files to copy and the weights slimline's wrapper dropped (BERT's pooler). Returns what changed in the config, what was zero-padded and
    the check's ``max_abs_diff``.

    A model no config describes (heads removed, FFN widths that differ per layer) is, with
    ``pad``, written in the original config's shapes with the removed heads and channels as
    zeros: the same function, loadable anywhere, but not smaller (the ONNX export is). Raises
    :class:`HFSaveError` when neither works."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "save_pretrained") or not hasattr(inner, "config"):
        raise HFSaveError(f"{type(model).__name__} is not a transformers model (no "
                          "save_pretrained/config): export it with export.onnx instead")
    fresh = _fresh(inner, inner.config)  # the class's own layout and shapes, built once
    conv1d = _conv1d_names(fresh)
    original = _shapes(fresh, conv1d)
    pad_to: dict[str, tuple[int, ...]] = {}
    try:
        config = _config_for(inner, conv1d, original)
    except HFSaveError as refusal:
        if not pad:
            raise
        pad_to = _padding(inner, conv1d, original, refusal)
        config = copy.deepcopy(inner.config)
    changed = {f: getattr(config, f) for f in FFN_WIDTH_FIELDS
               if hasattr(config, f) and getattr(config, f) != getattr(inner.config, f)}
    directory = Path(directory)
    state = _state_dict(inner, conv1d, pad_to)
    with atomic_dir(directory) as tmp:
        shell = type(inner)(config)  # real tensors, so whatever the model lacks is written
        missing = [k for k in shell.state_dict() if k not in state]
        from_source = _source_weights(source, missing)
        unexpected = shell.load_state_dict({**state, **from_source}, strict=False).unexpected_keys
        if unexpected:
            raise HFSaveError(f"{len(unexpected)} weights of the model have no place in "
                              f"{type(inner).__name__} (e.g. {unexpected[0]}): a module was "
                              "replaced or wrapped; nothing was written")
        with quiet_transformers():
            shell.save_pretrained(tmp, safe_serialization=True)
        copied = []
        for name in TOKENIZER_FILES if source is not None else ():
            if (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, Path(tmp) / name)
                copied.append(name)
        result: dict[str, Any] = {
            "config_changes": changed, "tokenizer_files": copied, "zero_padded": sorted(pad_to),
            "from_source": sorted(from_source),
            "freshly_initialised": [k for k in missing if k not in from_source]}
        x = check_inputs if check_inputs is not None else _default_inputs(model, inner)
        result["max_abs_diff"] = _reload_diff(model, inner, Path(tmp), x)
        if result["max_abs_diff"] > atol:
            raise HFSaveError(f"the reloaded checkpoint differs from the model by "
                              f"{result['max_abs_diff']:.3g} (> {atol}); nothing was written")
    return result


def _source_weights(source: str | os.PathLike | None, keys: list[str]) -> dict[str, torch.Tensor]:
    """``keys`` as stored in the source checkpoint (exact name, or under a base-model prefix
    such as ``bert.``); what is not there stays initialised."""
    if source is None or not keys:
        return {}
    path = Path(source)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        stored = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        stored = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        return {}
    found = {}
    for key in keys:
        match = [k for k in stored if k == key or k.endswith("." + key)]
        if match:
            found[key] = stored[match[0]]
    return found


def _default_inputs(model: nn.Module, inner: nn.Module) -> torch.Tensor:
    """Two random inputs the model takes: token ids of its vocabulary, or images."""
    config = inner.config
    generator = torch.Generator().manual_seed(0)
    if getattr(config, "vocab_size", None):
        return torch.randint(min(5, config.vocab_size - 1), config.vocab_size, (2, 16),
                             generator=generator)
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return torch.randn(2, config.num_channels, size, size, generator=generator)


def _tensor(output: Any) -> torch.Tensor:
    """The comparable tensor of a model output (a wrapper's tensor, or a ModelOutput's)."""
    if isinstance(output, torch.Tensor):
        return output
    for name in ("logits", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    return output[0]


def _reload_diff(model: nn.Module, inner: nn.Module, path: Path, x: torch.Tensor) -> float:
    """Largest output difference between ``model`` and the same wrapper around the reloaded
    checkpoint (Conv1D layers linearised again, as slimline built the original)."""
    from slimline.models.hf import linearize_conv1d

    with quiet_transformers():
        reloaded = type(inner).from_pretrained(path, local_files_only=True).eval()
    linearize_conv1d(reloaded)
    if getattr(inner, "pooler", "absent") is None:
        reloaded.pooler = None
    twin = copy.copy(model)
    if twin is not inner:
        twin._modules = dict(model._modules)
        twin._modules["model"] = reloaded
    else:
        twin = reloaded
    training = model.training
    with torch.no_grad():
        a, b = _tensor(model.eval()(x)), _tensor(twin.eval()(x))
    model.train(training)
    return float((a - b).abs().max())
