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


def test_quit_question_names_runs_in_words(qtbot, monkeypatch):
    """The 'Quit and cancel the running work (…)?' question lists runs, not channels."""
    from app.main_window import MainWindow

    window = MainWindow()
    qtbot.addWidget(window)
    monkeypatch.setattr(window.worker, "activity",
                        lambda: ("training.1", "training.2", "training.attention"))
    assert window.running_work() == ("training run B, training run C, "
                                     "training attention maps")
