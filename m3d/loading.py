"""Loading a saved transformers model folder with one clear error naming it for each way it can be
wrong: no or unreadable config, another architecture, missing or pickled weights, truncated weights,
weights that do not fit the config. Never a traceback, never a model with random weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Collection, TypeVar

Model = TypeVar("Model")


def read_json_object(path: Path) -> dict[str, Any]:
    """The object a JSON file holds (a config, a model index); a `ValueError` naming the file otherwise."""
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a JSON object ({error})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is not a JSON object (it holds a {type(payload).__name__})")
    return payload


def require_safetensors(folder: Path, filename: str | None = None) -> None:
    """A `FileNotFoundError` naming ``folder`` unless it holds ``filename`` (default: any ``.safetensors``);
    pickled ``.bin`` weights found instead are named, and never loaded."""
    found = (folder / filename).is_file() if filename else any(folder.glob("*.safetensors"))
    if not found:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" ({', '.join(pickled)} is pickle, which m3d never loads)" if pickled else ""
        raise FileNotFoundError(f"{folder} has no {filename or '.safetensors weights'}{hint}")


def check_settings(path: Path, settings: dict[str, Any], known: Collection[str]) -> None:
    """A `ValueError` naming ``path`` for a setting the model does not take (a misspelt or damaged key
    would be ignored by the libraries, the default used in silence) or a dtype torch does not have."""
    import torch

    unknown = sorted(key for key in settings if key not in known and not key.startswith("_"))
    if unknown:
        raise ValueError(f"{path} has settings this model does not take: {', '.join(unknown)}")
    for key in ("dtype", "torch_dtype"):
        value = settings.get(key)
        if value is not None and value != "auto" and not isinstance(getattr(torch, str(value), None), torch.dtype):
            raise ValueError(f"{path}: {key} {value!r} is not a torch dtype")


def require_saved_tensors(module: Any, weights: Path) -> None:
    """A `ValueError` naming ``weights`` unless it holds exactly ``module``'s tensors (a damaged header can
    rename one: the libraries would leave that parameter at random or on the meta device, and load)."""
    from safetensors import safe_open

    with safe_open(weights, "pt") as handle:
        saved = set(handle.keys())
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not hold the model's tensors (missing: {', '.join(missing[:3]) or '-'}; "
            f"unexpected: {', '.join(unexpected[:3]) or '-'}): the file is damaged or of another model"
        )


def load_saved_model(
    folder: str | Path, model_types: Collection[str], what: str, load: Callable[[Path], Model]
) -> Model:
    """``load(folder)`` after checking that ``folder`` holds one of ``model_types`` (``what`` names them
    in messages) with safetensors weights; reading errors become `ValueError` naming the folder."""
    from safetensors import SafetensorError

    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} is not a saved folder of {what} (no config.json)")
    settings = read_json_object(config)
    model_type = settings.get("model_type")
    if model_type not in model_types:
        raise ValueError(f"{folder} holds a {model_type!r} model, not {what}")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    check_settings(config, settings, {*CONFIG_MAPPING[model_type]().to_dict(), "auto_map"})
    require_safetensors(folder, "model.safetensors")
    try:
        model = load(folder)
        require_saved_tensors(model, folder / "model.safetensors")
        return model
    except SafetensorError as error:
        raise ValueError(f"{folder}/model.safetensors is truncated or not a safetensors file ({error})") from None
    except RuntimeError as error:
        if "mismatch" not in str(error):
            raise
        raise ValueError(f"{folder}: model.safetensors does not fit config.json (tensor shapes differ)") from None
