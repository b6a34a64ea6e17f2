"""Shared fixtures: the tiny random HF models of hf_models.CASES, built and saved once."""

import importlib.util
import pathlib

import pytest

_spec = importlib.util.spec_from_file_location(
    "jaxlm_tests_convert_hf_models", pathlib.Path(__file__).with_name("hf_models.py"))
hf_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_models)


@pytest.fixture(scope="session")
def hf_models_module():
    return hf_models


@pytest.fixture(scope="session")
def hf_saved(tmp_path_factory):
    """case -> (torch model, saved directory), built on first use and kept for the session."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    built = {}

    def get(case):
        if case not in built:
            model = hf_models.build_hf(case, seed=len(case))
            directory = tmp_path_factory.mktemp(f"hf_{case}")
            built[case] = (model, hf_models.save_hf(model, directory))
        return built[case]
    return get
