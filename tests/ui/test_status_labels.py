"""The busy indicator names jobs in words, not worker channel names."""

from app.main_window import job_label


def test_training_channels_are_named_by_their_run():
    assert job_label("training.0") == "training run A"
    assert job_label("training.2") == "training run C"
    assert job_label("training.attention") == "training attention maps"


def test_other_channels_keep_their_names():
    assert job_label("measure") == "measure"
    assert job_label("attention") == "attention"
    assert job_label("positional.table") == "positional table"
