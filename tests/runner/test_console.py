"""What a run shows: one progress line per evaluation instead of lm-eval's bars, and the libraries'
log lines in runner.log only with verbose=true."""

import json
import logging

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from runner import progress as P
from runner.cli import LIBRARIES, LM_EVAL, quiet_libraries
from runner.config import EvalConfig
from runner.evaluate import evaluate


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from runner.models import load_model

    return load_model({"path": str(tiny_llama), "dtype": "float32"})


@pytest.fixture
def run_log(tmp_path):
    """runner.log as Hydra's job logging writes it (a file handler on the root logger, INFO and up);
    the libraries' logging is put back afterwards."""
    import transformers

    tf = transformers.utils.logging
    names = (*LM_EVAL, *LIBRARIES)
    levels = {n: logging.getLogger(n).level for n in names}
    verbosity, propagate = tf.get_verbosity(), tf._get_library_root_logger().propagate
    root = logging.getLogger()
    path = tmp_path / "runner.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    yield path
    root.removeHandler(handler)
    handler.close()
    root.setLevel(old_level)
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    tf.set_verbosity(verbosity)
    tf.enable_default_handler()
    tf.enable_propagation() if propagate else tf.disable_propagation()


def quick_eval(**kw):
    return OmegaConf.structured(EvalConfig(tasks=["toy_arith"], limit=2, batch_size=8, max_gen_toks=4, **kw))


def test_verbose_is_a_top_level_key_and_a_misspelling_still_fails(compose):
    assert compose(["recipe=sft"]).verbose is False
    assert compose(["recipe=sft", "verbose=true"]).verbose is True
    with pytest.raises(ConfigCompositionException):
        compose(["recipe=sft", "verbos=true"])


def test_verbose_does_not_change_what_a_run_is(compose):
    from runner.resume import fingerprint

    assert fingerprint(compose(["recipe=sft"])) == fingerprint(compose(["recipe=sft", "verbose=true"]))


def test_runner_log_keeps_lm_eval_out_unless_verbose(tiny, tmp_path, run_log, capfd):
    model, tok = tiny
    quiet_libraries(verbose=False)
    evaluate(model, tok, quick_eval(), tmp_path / "quiet", label="quiet")
    quiet = run_log.read_text()
    assert "evaluated quiet on toy_arith" in quiet  # the runner's own line stays
    assert "lm_eval" not in quiet and "pretrained" not in quiet, quiet
    err = capfd.readouterr().err
    assert "it/s" not in err and "Running generate_until requests" not in err, err  # no tqdm bar of lm-eval's

    quiet_libraries(verbose=True)
    evaluate(model, tok, quick_eval(), tmp_path / "verbose", label="verbose")
    verbose = run_log.read_text()[len(quiet):]
    assert "[lm_eval.models.huggingface][WARNING] - `pretrained` model kwarg is not of type `str`" in verbose, verbose
    assert "[lm_eval.evaluator][INFO]" in verbose  # its INFO lines too
    assert "evaluated verbose on toy_arith" in verbose


def test_one_progress_line_counts_every_request_of_every_kind(tiny, tmp_path, capfd):
    model, tok = tiny
    ev = OmegaConf.structured(EvalConfig(tasks=["toy_arith", "toy_arith_mc", "toy_ppl"], limit=3, batch_size=8,
                                         max_gen_toks=4))
    with P.recorded() as bars:
        evaluate(model, tok, ev, tmp_path, label="tiny")
    # every request lm-eval sent: one per generation, one per choice, one per rolling document
    sent = sum(len(resp) for task in ("toy_arith", "toy_arith_mc", "toy_ppl")
               for line in (tmp_path / f"samples_{task}.jsonl").read_text().splitlines()
               for resp in json.loads(line)["resps"])
    assert sent > 3 * 3  # the multiple-choice task sends more than one request per problem
    assert bars == [P.Record("evaluate tiny", sent, sent)]
    err = capfd.readouterr().err
    assert "%|" not in err and "it/s" not in err, err  # none of lm-eval's tqdm bars


def test_an_evaluation_inside_a_stage_joins_its_display(tiny, tmp_path):
    model, tok = tiny
    with P.recorded() as bars, P.progress("sweep", total=2, enabled=False) as outer:
        for i in range(2):
            evaluate(model, tok, quick_eval(), tmp_path / str(i), label=f"trial {i}")
            outer.advance()
    assert bars == [P.Record("evaluate trial 0", 2, 2), P.Record("evaluate trial 1", 2, 2), P.Record("sweep", 2, 2)]
