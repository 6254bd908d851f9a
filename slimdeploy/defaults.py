"""Tuned defaults, in one place: the CLI, the pipeline and the stages read them from here.

Each value says where it was tuned (benchmarks/RESULTS.md has the measurements).
"""

# Dense training of the embedded fmnist-vit: 7 epochs at lr 1e-3 reached 88.3% in 9 min on 2 cores.
TRAIN = dict(epochs=7, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_epochs=0.5, label_smoothing=0.1)

# Mask search: ViT-Slim's factors (not divided by the number of processes), AdamW at a constant lr.
SEARCH = dict(epochs=2, lr=5e-4, weight_decay=1e-3, w_attn=2e-4, w_mlp=5e-5, w_tok=1e-4, w_embed=1e-4)

# Selection: candidates scored on 2,048 training images (0.45 s a candidate on 2 cores for fmnist-vit); with
# retraining to come, the best 3 and ViT-Slim's rule get a short recovery first (200 steps at batch 32).
SELECT = dict(rounds=4, calibration_images=2048, recovery_steps=200, recovery_top=3, tau=1.0)

# Attentive tokens: rank by half the class token's attention, half the search's per-position importance (taken
# on about 5,000 training images at the end of the attentive search). On plain Fashion-MNIST at equal counts
# (3 searches) this was 2.1-2.9 points above attention alone at half the tokens, -0.2 to +7.0 at 0.3 of them;
# weights 0.8 and 1 did worse (RESULTS.md, "A position prior in the ranking, built in").
TOKENS = dict(prior_weight=0.5, prior_images=5120)

# Profiling: table widths every 8 channels, 10 token counts, and 40 whole models for the calibration, 40% of them
# random structures and the rest what the solver picks (plus the dense model and 4 ranked twin pairs; 32 models,
# half random, before). On a Zen 5 EPYC's stored fidelity runs, more of the solver's picks in the fit took the
# held-out picks' slow bias from +2.1% to +1.2-2.0% (RESULTS.md, "The solver's region"); a quarter random priced
# deit_small's smallest random structures worse, so 16 random stay. deit_small's profile: 375-402 s on that CPU.
PROFILE = dict(step=8, token_points=10, calibration_models=40, random_share=0.4)

# Retraining with distillation from the dense model.
RETRAIN = dict(epochs=5, lr=1e-3, warmup_epochs=0.2, distill="soft", alpha=0.7, tau=2.0)

# `slimdeploy run`: half the dense model's measured latency on this machine, and a loud warning (exit 1)
# when top-1 falls more than 1.5 points below the dense model's.
RUN = dict(target_latency="50%", device="local", max_drop=1.5)
