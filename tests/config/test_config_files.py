"""A config file is input: whatever goes wrong inside it is one line naming the file and
line (jaxlm.config.overrides.load_config_file)."""

import pytest

from jaxlm import config as config_lib

CASES = {
    "syntax": ("def get_config(:\n    pass\n", ":1: SyntaxError: invalid syntax"),
    "mistyped value": (
        "from jaxlm.config import defaults\n\ndef get_config():\n    cfg = defaults()\n"
        "    cfg.train.steps = 'ten'\n    return cfg\n",
        ":5: TypeError: Could not override field 'steps' (reference). ten is of original type "
        "<class 'str'> and cannot be casted to type <class 'int'>"),
    "missing name": ("x = undefined_name\n",
                     ":1: NameError: name 'undefined_name' is not defined"),
    "failing get_config": (
        "def helper():\n    return {}['model']\n\ndef get_config():\n    return helper()\n",
        ":2: KeyError: 'model'"),
    "not a ConfigDict": ("def get_config():\n    return {'train': {}}\n",
                         ": get_config() returned a dict, not an ml_collections.ConfigDict"),
}


@pytest.mark.parametrize("source,message", CASES.values(), ids=CASES.keys())
def test_a_broken_config_file_is_one_line_naming_file_and_line(tmp_path, source, message):
    path = tmp_path / "mine.py"
    path.write_text(source)
    with pytest.raises(config_lib.ConfigError) as raised:
        config_lib.load_config_file(path)
    assert str(raised.value) == f"{path}{message}"
