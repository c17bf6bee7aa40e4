"""``gircse.cli.build_parser``: every subcommand registered, each running its module's ``run_<name>``."""
from __future__ import annotations

from gircse import cli


def test_parser_has_one_function_per_subcommand():
    parser = cli.build_parser()
    for command in ("demo", "encode"):
        args = parser.parse_args([command])
        assert args.func is getattr(getattr(cli, command), f"run_{command}")


def test_subcommands_are_registered():
    parser = cli.build_parser()
    for argv, run in ((["eval", "--task", "t"], cli.eval.run_eval), (["scale", "--task", "t"], cli.scale.run_scale),
                      (["explain", "text"], cli.explain.run_explain), (["eval-mteb", "--tasks", "x"],
                                                                       cli.eval_mteb.run_eval_mteb),
                      (["encode-corpus", "in.jsonl", "out"], cli.encode_corpus.run_encode_corpus),
                      (["search", "out", "query"], cli.search.run_search)):
        assert parser.parse_args(argv).func is run
    assert parser.parse_args(["eval", "--task", "t", "--method", "two-stage", "--prompt-style", "reference"]).method \
        == "two-stage"
