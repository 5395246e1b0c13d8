"""One module per training method, each over the one loop :func:`atop.training.fit`.

| module | method | paper |
|---|---|---|
| :mod:`atop.trainers.classifier` | standard training of the classifier ``f`` | §4 |
| :mod:`atop.trainers.pgd_at` | PGD adversarial training (baseline) | Madry et al. 2018 |
| :mod:`atop.trainers.rvs` | Robustness-via-Synthesis (baseline, OT term) | Baytaş & Deb 2023 |
| :mod:`atop.trainers.purifier` | purifier pretraining, the GAN update | Eq. 8 |
| :mod:`atop.trainers.atop` | AToP fine-tuning of the purifier | Eq. 9, Algorithm 1 |

:mod:`atop.trainers.common` holds what the classifier trainers share. Each module defines
its typed parameters (``*Params``), its step, its setup and its checkpoint ``meta``.
"""
