"""minidiff: a small, readable PyTorch implementation of the Diffutron masked-diffusion LM.

References: Diffutron (arXiv 2603.20466), the pipeline reproduced; MDLM (2406.07524) and
LLaDA (2502.09992), the diffusion objective and sampler; ModernBERT (2412.13663) and mmBERT
(2509.06888), the encoder. A reader starts at docs/walkthrough.py (see README, "Reading order").

    import minidiff
    model = minidiff.load_model("jhu-clsp/mmBERT-base")   # or a local directory
    tok = minidiff.load_tokenizer("jhu-clsp/mmBERT-base")
"""
from minidiff.model import ModelConfig, ModernBertMLM

__version__ = "0.1.0"


def load_model(name_or_path, *, dtype=None, device=None, revision=None, **kwargs):
    """A ModernBertMLM in eval mode from a local directory or a hub id (see checkpoint.load_model;
    e.g. allow_missing_head=True loads a headless encoder checkpoint)."""
    # deferred: importing checkpoint (or tokenizer) here would make `python -m minidiff.plumbing.checkpoint`
    # run a module that is already imported (runpy's double-import warning on stderr)
    from minidiff.plumbing.checkpoint import load_model as _load_model

    return _load_model(name_or_path, dtype=dtype, device=device, revision=revision, **kwargs)


def load_tokenizer(name_or_path, *, revision=None):
    """A Tokenizer from a directory (or hub id) holding tokenizer.json (see tokenizer.load_tokenizer)."""
    from minidiff.data.tokenizer import load_tokenizer as _load_tokenizer  # deferred: see load_model

    return _load_tokenizer(name_or_path, revision=revision)


__all__ = ["ModelConfig", "ModernBertMLM", "load_model", "load_tokenizer", "__version__"]
