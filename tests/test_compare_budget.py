"""benchmarks.compare's budget split (`--shares` over STAGE_SHARES) and its SR-vs-bicubic
sanity table: a super-resolution stage that loses to bicubic upsampling is marked."""
import pytest

from benchmarks import compare_budget, compare_report
from ldm_jax.errors import UserError


def test_shares_override_one_system_and_keep_the_others():
  shares = compare_budget.parse_shares("base=0.35, sr16=0.15,sr32=0.5")
  assert shares["cascade"] == {"base": 0.35, "sr16": 0.15, "sr32": 0.5}
  assert shares["ldm"] == compare_budget.STAGE_SHARES["ldm"]
  assert compare_budget.parse_shares("") == compare_budget.STAGE_SHARES


@pytest.mark.parametrize("text, culprit", [
    ("sr64=0.5", "'sr64=0.5'"), ("base", "'base'"), ("base=x", "'x'"),
    ("base=0", "(0, 1]"), ("base=0.5", "sum to 1.1")])
def test_bad_shares_name_the_culprit(text, culprit):
  with pytest.raises(UserError, match="--shares") as e:
    compare_budget.parse_shares(text)
  assert culprit in str(e.value)


def test_report_marks_an_sr_stage_that_loses_to_bicubic():
  system = {"parameters": {"base": 1e6}, "parameters_total": 1e6,
            "plan": {"base": {"train_flops_per_image": 1e9}},
            "train_images_per_sec": {"base": 10.0}, "sampling_flops_per_image": 1e9,
            "train_minutes": 1.0, "loss_gap": {},
            "curve": [{"sec_per_image": 0.1, "class_accuracy": 0.5, "frechet_distance": 3.0,
                       "train_minutes": 1.0, "num_samples": 10}],
            "sr_vs_bicubic": {"sr16": {"sr_psnr": 22.7, "bicubic_psnr": 20.9, "images": 500},
                              "sr32": {"sr_psnr": 20.3, "bicubic_psnr": 20.7, "images": 500}}}
  report = {"budget_minutes": 1, "preset": "default", "guidance": 3.0, "command": "c",
            "real": {"classifier_test_accuracy": 0.9, "num_images": 10,
                     "frechet_distance_train_vs_test": 1.0},
            "systems": {"cascade": system}}
  md = compare_report.markdown(report)
  assert "| cascade | sr16 | 500 | 22.70 | 20.90 | yes |" in md
  assert "| cascade | sr32 | 500 | 20.30 | 20.70 | **no** |" in md


def test_the_judge_trains_on_the_whole_split_when_the_systems_train_on_a_slice():
  from benchmarks.compare_quality import judge_data
  from ldm_jax.data import default_data_config
  data = default_data_config()
  data.train_split = "train[:1000]"
  judge = judge_data(data)
  assert judge.train_split == "train" and data.train_split == "train[:1000]"
  assert judge.eval_split == data.eval_split and judge.image_size == data.image_size
