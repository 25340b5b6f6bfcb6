"""runner.progress: one display per process, nested bars join it, the main process only."""

import pytest

from runner import progress as P


def test_a_bar_records_its_total_and_what_was_done():
    with P.recorded() as found:
        with P.progress("work", total=3, enabled=False) as bar:
            for _ in range(3):
                bar.advance()
    assert found == [P.Record("work", 3, 3)]


def test_a_bar_opened_inside_another_joins_its_display_and_leaves_it():
    with P.recorded() as found:
        with P.progress("outer", total=2, enabled=False) as outer:
            display = P._shown[-1]
            for i in range(2):
                with P.progress(f"inner {i}", enabled=False) as inner:
                    assert P._shown == [display] and len(display.tasks) == 2  # one display, two lines
                    inner.add_total(4)
                    inner.add_total(1)  # a total known one part at a time
                    inner.advance(5)
                assert [t.description for t in display.tasks] == ["outer"]
                outer.advance()
    assert not P._shown
    assert found == [P.Record("inner 0", 5, 5), P.Record("inner 1", 5, 5), P.Record("outer", 2, 2)]


def test_the_training_display_takes_in_bars_opened_during_training():
    display = P.progress_bar(enabled=False)
    display.add_task("train", total=1, info="")
    with display:
        with P.progress("evaluate", total=1) as bar:
            assert len(display.tasks) == 2
            bar.advance()
    assert not P._shown


def test_a_bar_ends_on_an_error_and_the_next_one_starts_afresh():
    with pytest.raises(RuntimeError):
        with P.progress("fails", total=2, enabled=False):
            raise RuntimeError("stop")
    assert not P._shown
    with P.recorded() as found, P.progress("next", total=1, enabled=False) as bar:
        bar.advance()
    assert found == [P.Record("next", 1, 1)]


@pytest.mark.parametrize("env, main", [({}, True), ({"RANK": "0"}, True), ({"RANK": "1"}, False),
                                       ({"LOCAL_RANK": "2"}, False)])
def test_only_the_main_process_shows_progress(monkeypatch, env, main):
    for key in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert P.is_main_process() is main


def test_the_outermost_bar_prints_its_final_line_on_stderr(capfd):
    with P.progress("layers", total=3, enabled=True) as bar:
        bar.advance(3, info="done")
    err = capfd.readouterr().err
    assert "layers" in err and "3/3" in err and "done" in err


def test_descriptions_are_shown_as_written_not_as_markup(capfd):
    with P.recorded() as found, P.progress("evaluate models[0] [/x]", total=1, enabled=True) as bar:
        bar.advance(info="[bold]")
    assert found == [P.Record("evaluate models[0] [/x]", 1, 1)]
    assert "evaluate models[0] [/x]" in capfd.readouterr().err


def test_log_lines_pass_above_the_bars_on_a_terminal(monkeypatch):
    import io
    import logging
    import sys

    from rich.console import Console

    screen, before = io.StringIO(), sys.stdout
    handler = logging.StreamHandler(sys.stdout)  # as Hydra's console handler holds sys.stdout
    log = logging.getLogger("tests.progress.terminal")
    log.addHandler(handler)
    log.propagate = False
    monkeypatch.setattr(P, "progress_bar", lambda enabled=True: P._Display(
        *P.Progress.get_default_columns(), console=Console(file=screen, force_terminal=True, width=40)))
    try:
        with P.progress("work", total=1) as bar:
            assert sys.stdout is not before  # rich's proxy while the bars are live
            log.warning("a log line longer than the forty columns of this terminal")
            bar.advance()
        assert handler.stream is before and sys.stdout is before  # put back
    finally:
        log.removeHandler(handler)
    shown = screen.getvalue()
    assert "a log line longer than the forty columns of this terminal\n" in shown  # one line, not wrapped
