"""The figures and tables of benchmarks/compare.py: quality vs training time, sample grids
side by side, a corrupted base sample through the super-resolution stages, and compare.md."""
import os

import numpy as np

from ldm_jax import images as image_io


def figures(out: str, results: dict, samples: dict, shown, real: dict) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for system, r in results.items():
    xs = [p["train_minutes"] for p in r["curve"]]
    axes[0].plot(xs, [p["class_accuracy"] for p in r["curve"]], "o-", label=system)
    axes[1].plot(xs, [p["frechet_distance"] for p in r["curve"]], "o-", label=system)
  axes[0].axhline(real["classifier_test_accuracy"], ls="--", c="gray", label="real test images")
  axes[1].axhline(real["frechet_distance_train_vs_test"], ls="--", c="gray",
                  label="real train images")
  axes[0].set(xlabel="training minutes (2 CPU cores)", ylabel="class accuracy")
  axes[1].set(xlabel="training minutes (2 CPU cores)", ylabel="Frechet distance (classifier)",
              yscale="log")
  for a in axes:
    a.legend()
    a.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "quality_vs_time.png"), dpi=100)
  plt.close(fig)

  panels = []
  for system in results:
    images, labels = samples[system]
    rows = [images[labels == c][:8] for c in range(10)]
    panels.append(image_io.make_grid(np.concatenate(rows), ncols=8))
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 6))
  for a, p, system in zip(np.atleast_1d(axes), panels, results):
    a.imshow(p.squeeze(), cmap="gray", interpolation="nearest")
    a.set_title(system)
    a.axis("off")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "samples.png"), dpi=100)
  plt.close(fig)

  if shown:
    keys = list(shown)
    fig, axes = plt.subplots(len(keys), 3, figsize=(6, 2 * len(keys)))
    for r, key in enumerate(keys):
      for c, stage_images in enumerate(shown[key][:3]):
        axes[r, c].imshow(np.asarray(stage_images[0]).squeeze(), cmap="gray", vmin=-1, vmax=1,
                          interpolation="nearest")
        axes[r, c].axis("off")
        if r == 0:
          axes[r, c].set_title(["base", "SR stage 1", "SR stage 2"][c])
      axes[r, 0].text(-0.5, 0.5, f"{key[0]}\naug {key[1]}", transform=axes[r, 0].transAxes,
                      ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "error_propagation.png"), dpi=100)
    plt.close(fig)


def markdown(report: dict) -> str:
  lines = [f"# Pixel vs cascade vs LDM ({report['budget_minutes']:g} training minutes per "
           f"system, preset `{report['preset']}`)", "",
           f"Command: `{report['command']}`", "",
           "| system | parameters (per model) | train GFLOP / image (per stage) | train "
           "images/s (per stage) | sampling GFLOP / image | sampling s / image | class "
           f"accuracy (g={report['guidance']:g}) | Frechet distance | train minutes |",
           "|---|---|---|---|---|---|---|---|---|"]
  for system, r in report["systems"].items():
    per = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in r["parameters"].items())
    flops = ", ".join(f"{k} {v['train_flops_per_image'] / 1e9:.3f}"
                      for k, v in r["plan"].items())
    ips = ", ".join(f"{k} {v:.0f}" for k, v in r["train_images_per_sec"].items())
    final = r["curve"][-1]
    lines.append(
        f"| {system} | {r['parameters_total'] / 1e6:.2f}M ({per}) | {flops} | {ips} | "
        f"{r['sampling_flops_per_image'] / 1e9:.2f} | {final['sec_per_image']:.4f} | "
        f"{final['class_accuracy']:.3f} | {final['frechet_distance']:.2f} | "
        f"{r['train_minutes']:.1f} |")
  real = report["real"]
  lines += ["", f"Real data: classifier test accuracy {real['classifier_test_accuracy']:.3f}; "
            f"Frechet distance of {real['num_images']} training images to the test split "
            f"{real['frechet_distance_train_vs_test']:.2f}.", "",
            "## Quality over the budget", "",
            "| system | train minutes | class accuracy | Frechet distance | samples |",
            "|---|---|---|---|---|"]
  for system, r in report["systems"].items():
    for p in r["curve"]:
      lines.append(f"| {system} | {p['train_minutes']:.1f} | {p['class_accuracy']:.3f} | "
                   f"{p['frechet_distance']:.2f} | {p['num_samples']} |")
  lines += ["", "## Denoising loss, training vs held-out images (final parameters)", "",
            "| system | stage | train | held-out | gap | ratio |", "|---|---|---|---|---|---|"]
  for system, r in report["systems"].items():
    for stage, g in r["loss_gap"].items():
      lines.append(f"| {system} | {stage} | {g['train']:.5f} | {g['held_out']:.5f} | "
                   f"{g['gap']:+.5f} | {g['ratio']:.4f} |")
  sr = {(system, stage): row for system, r in report["systems"].items()
        for stage, row in r.get("sr_vs_bicubic", {}).items()}
  if sr:
    lines += ["", "## Super-resolution stages vs bicubic upsampling", "",
              "Each SR stage at the end of its training, given held-out images shrunk to its "
              "input size (its own sampling settings, augmentation level 0): PSNR of its "
              "output and of bicubic upsampling against the real image. A stage that does not "
              "beat bicubic is not a working baseline.", "",
              "| system | stage | images | PSNR SR (dB) | PSNR bicubic (dB) | beats bicubic |",
              "|---|---|---|---|---|---|"]
    for (system, stage), row in sr.items():
      verdict = "yes" if row["sr_psnr"] > row["bicubic_psnr"] else "**no**"
      lines.append(f"| {system} | {stage} | {row['images']} | {row['sr_psnr']:.2f} | "
                   f"{row['bicubic_psnr']:.2f} | {verdict} |")
  prop = report.get("error_propagation", {})
  if prop:
    lines += ["", "## Error propagation through the cascade", "",
              "Survival: the share of a base-sample corruption still present in the 32x32 output "
              "(L2 at the base resolution; 1 = carried over whole). Wrong class: the share of "
              "outputs the classifier assigns to the base sample's class instead of the class "
              "the SR stages were asked for.", "",
              "| SR stages | aug level | blotch survival | noise survival | wrong class "
              "survives | wrong class corrected | clean accuracy |",
              "|---|---|---|---|---|---|---|"]
    for variant, rows in prop.items():
      for level, row in rows.items():
        lines.append(f"| {variant} | {level[4:]} | {row['blotch_survival']:.3f} | "
                     f"{row['noise_survival']:.3f} | {row['wrong_class_survival']:.3f} | "
                     f"{row['wrong_class_corrected']:.3f} | {row['final_accuracy_clean']:.3f} |")
  return "\n".join(lines) + "\n"
