"""Progress off a terminal: plain lines, at most one per interval plus the last, with the rate and the time left."""
import io

from pipeline.progress import Progress, format_seconds


class _Pipe(io.StringIO):
    def isatty(self):
        return False


def test_plain_lines_at_most_one_per_interval_and_the_last(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 30.0, 31.0])        # construction, then one call each
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: next(clock))
    out = _Pipe()
    p = Progress("[eval]", "questions", every_s=10.0, stream=out)
    p(10, 40)                                          # 1 s: too soon
    p(20, 40)                                          # 2 s: too soon
    p(30, 40)                                          # 30 s: a line
    p(40, 40)                                          # the last: always
    lines = out.getvalue().splitlines()
    assert lines == ["[eval] 30/40 questions  1.0 questions/s  10s left",
                     "[eval] 40/40 questions  1.3 questions/s  0s left"]
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.4, 61, 3725)] == ["0s", "59s", "1m01s", "1h02m"]
