import pytest
from hf_reference import build_hf_models


@pytest.fixture(scope="module")
def hf_models(hf, tmp_path_factory):
    """name -> (transformers model in eval mode, the folder it saved itself to): hf_reference.HF_MODELS."""
    return build_hf_models(hf, tmp_path_factory.mktemp)
