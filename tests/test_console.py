"""The console progress line: rate and ETA from a clock, whole lines when piped, one line
rewritten in place on a terminal."""
import io

from ldm_jax import console


class Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


class Tty(io.StringIO):
  def isatty(self):
    return True


def test_piped_progress_prints_whole_lines_at_intervals():
  clock, out = Clock(), io.StringIO()
  p = console.Progress("ldm", 100, every_secs=30, stream=out, clock=clock)
  for step in range(1, 101):
    clock.t = step * 1.0  # 1 step/s
    p.update(step, {"loss": 1.0 / step} if step % 10 == 0 else None)
  p.close()
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue()
  # Step 1 (the first), then every 30 s, then the last step; close() adds nothing new.
  assert [line.split()[2] for line in lines] == ["1/100", "31/100", "61/100", "91/100",
                                                 "100/100"]
  assert lines[1] == "ldm  step 31/100  loss 0.03333  1 steps/s  ETA 1m09s"
  assert lines[-1].endswith("done")


def test_close_prints_the_last_step_of_a_stopped_run():
  clock, out = Clock(), io.StringIO()
  p = console.Progress("ae", 1000, start=500, every_secs=30, stream=out, clock=clock)
  for step in range(501, 511):
    clock.t += 0.5
    p.update(step)
  p.close()
  lines = out.getvalue().splitlines()
  assert lines[0].startswith("ae  step 501/1000") and lines[-1].startswith("ae  step 510/1000")
  assert "2 steps/s" in lines[-1] and "ETA 4m05s" in lines[-1]


def test_terminal_progress_rewrites_one_line():
  clock, out = Clock(), Tty()
  p = console.Progress("sample", 8, unit="images", stream=out, clock=clock)
  for i in range(1, 9):
    clock.t = i
    p.update(i)
  p.close()
  text = out.getvalue()
  assert text.count("\n") == 1 and text.endswith("\n")
  assert text.count("\r") == 9  # 8 updates (>= 0.25 s apart) and the final one
  assert text.rstrip().split("\r")[-1].startswith("sample  image 8/8")


def test_format_duration():
  assert [console.format_duration(s) for s in (0, 59.4, 61, 3599, 3600, 90000)] == [
      "0s", "59s", "1m01s", "59m59s", "1h00m", "25h00m"]
  assert console.format_duration(float("inf")) == "?"
