"""Hugging Face Hub downloads through ``huggingface_hub`` (honours HF_TOKEN, HF_HOME, HF_HUB_OFFLINE).

Files are fetched one by one so that a failure names the file that could not be had; the hub client
shows a progress bar for each download and reuses its cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from . import SourceError



def download(repo_id: str, progress: Callable[[str], None]) -> Path:
    """Fetch config, weights and tokenizer of ``repo_id``; returns the snapshot directory."""
    from huggingface_hub import hf_hub_download

    from .hf import TOKENIZER_FILES
    from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError

    def fetch(filename: str, required: bool = True) -> Path | None:
        progress(f"fetching {repo_id}/{filename}")
        try:
            return Path(hf_hub_download(repo_id, filename))
        except RemoteEntryNotFoundError:
            if required:
                raise SourceError(f"{repo_id} has no file {filename} on the Hugging Face Hub") from None
            return None
        except GatedRepoError:
            raise SourceError(f"{repo_id} is gated: accept its licence on huggingface.co and set HF_TOKEN") from None
        except RepositoryNotFoundError:
            raise SourceError(f"no Hugging Face repo {repo_id!r} (or it is private: set HF_TOKEN)") from None
        except Exception as e:  # network down, offline mode without a cached copy, proxy errors
            if not required:  # optional files: absent, or not cached in offline mode
                return None
            raise SourceError(
                f"could not get {filename} of {repo_id} from the Hugging Face Hub ({e.__class__.__name__}); "
                f"on a machine with network run `hf download {repo_id} --local-dir DIR`, copy DIR here and "
                "compile DIR, or unset HF_HUB_OFFLINE if it is set") from None

    config = fetch("config.json")
    assert config is not None  # required files raise instead
    index = fetch("model.safetensors.index.json", required=False)
    if index is not None:
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            fetch(shard)
    else:
        fetch("model.safetensors")
    for name in TOKENIZER_FILES:  # what the HF-directory frontend copies into the artifact
        fetch(name, required=False)
    return config.parent
