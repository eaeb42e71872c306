"""Storage settings are declared once (StorageConfig's fields) and every interface reads them."""

from __future__ import annotations

import argparse

import pytest

from kvstudio.cli.storage_options import add_storage_options, storage_from_args
from kvstudio.core.storage import StorageConfig, storage_from_options
from kvstudio.core.storage.base import CodecError
from kvstudio.gui.widgets.storage_form import StorageForm


def test_eval_variants_read_booleans_and_none_as_every_interface_does():
    assert storage_from_options({"measure_error": "on"})[0].measure_error is True
    assert storage_from_options({"measure_error": "off"})[0].measure_error is False
    assert storage_from_options({"merge": "minicache", "merge_from": "none"})[0].merge_from is None
    with pytest.raises(CodecError, match="measure_error=perhaps"):
        storage_from_options({"measure_error": "perhaps"})


def test_the_command_line_has_one_option_per_declared_field_with_its_default():
    parser = argparse.ArgumentParser()
    add_storage_options(parser)
    options = {action.dest: action for action in parser._actions}
    for spec in StorageConfig.parameters():
        assert spec.name in options, spec.name
        assert options[spec.name].help.startswith(spec.help) or spec.help in options[spec.name].help
    args = parser.parse_args([])
    args.policy = "h2o"
    assert storage_from_args(args) == StorageConfig()  # nothing given: the declared defaults


def test_the_declared_range_is_checked_on_every_path(qtbot):
    with pytest.raises(CodecError, match="--merge-t must be between 0 and 1"):
        StorageConfig(merge="minicache", merge_t=1.5).validate()
    form = StorageForm()
    qtbot.addWidget(form)
    for spec in StorageConfig.parameters():
        editor = getattr(form, spec.name, None)
        if editor is None or not hasattr(editor, "maximum"):
            continue
        assert editor.maximum() == spec.maximum and editor.toolTip() == spec.help, spec.name
        if spec.name != "merge_from":  # below its range: "half depth" (None)
            assert editor.minimum() == spec.minimum, spec.name
