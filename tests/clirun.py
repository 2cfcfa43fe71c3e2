"""Run the `personaedit` command in-process: (exit status, stdout, stderr)."""

from personaedit.cli import main


def run_cli(args, capsys):
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
