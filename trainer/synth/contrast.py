"""Per-case attenuation of tissues (HU), by contrast phase, with every unknown randomised.

Phases, drawn per case (`PHASES`):

- ``portal-venous`` (the usual abdominal CT): spleen about as bright as the liver, homogeneous;
- ``non-contrast``: spleen 40-60 HU and darker than the liver; vessels as dark as blood;
- ``arterial``: bright aorta, corticomedullary kidneys, and a heterogeneous (zebra/moire) spleen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PHASES: tuple[str, ...] = ("portal-venous", "non-contrast", "arterial")
_PHASE_P = (0.6, 0.2, 0.2)


@dataclass(frozen=True, kw_only=True, slots=True)
class Contrast:
    """HU of each tissue in one case; `spleen_zebra` is the arterial banding's amplitude (HU)."""

    phase: str
    liver: float
    spleen: float
    spleen_zebra: float
    kidney_cortex: float
    kidney_medulla: float
    pancreas: float
    artery: float
    vein: float
    portal: float
    myocardium: float
    heart_blood: float
    adrenal: float
    muscle: float
    bowel_wall: float


def sample_contrast(rng: np.random.Generator) -> Contrast:
    """Draw a phase, then each tissue's HU within what that phase shows in real scans."""
    phase = str(rng.choice(PHASES, p=_PHASE_P))
    muscle = rng.uniform(35, 60)
    draw = {"non-contrast": _non_contrast, "arterial": _arterial}.get(phase, _portal_venous)
    return draw(rng.uniform, phase, muscle)


def _non_contrast(u, phase: str, muscle: float) -> Contrast:
    spleen = u(40, 60)
    blood = u(35, 55)
    kidney = u(28, 40)
    return Contrast(
        phase=phase,
        liver=spleen + u(6, 18),
        spleen=spleen,
        spleen_zebra=0.0,
        kidney_cortex=kidney,
        kidney_medulla=kidney - u(0, 6),
        pancreas=u(35, 50),
        artery=blood,
        vein=blood,
        portal=blood,
        myocardium=u(35, 50),
        heart_blood=blood,
        adrenal=u(20, 40),
        muscle=muscle,
        bowel_wall=u(25, 40),
    )


def _arterial(u, phase: str, muscle: float) -> Contrast:
    artery = u(250, 450)
    spleen = u(100, 150)
    return Contrast(
        phase=phase,
        liver=u(60, 85),
        spleen=spleen,
        spleen_zebra=u(40, 80),
        kidney_cortex=u(180, 280),
        kidney_medulla=u(60, 110),
        pancreas=u(100, 150),
        artery=artery,
        vein=u(60, 120),
        portal=u(90, 160),
        myocardium=u(90, 140),
        heart_blood=artery * u(0.8, 1.0),
        adrenal=u(50, 90),
        muscle=muscle,
        bowel_wall=u(60, 110),
    )


def _portal_venous(u, phase: str, muscle: float) -> Contrast:
    liver = u(85, 135)
    vessel = u(130, 220)
    kidney = u(140, 220)
    return Contrast(
        phase=phase,
        liver=liver,
        spleen=liver + u(-15, 35),
        spleen_zebra=0.0,
        kidney_cortex=kidney,
        kidney_medulla=kidney - u(0, 30),
        pancreas=u(80, 120),
        artery=vessel,
        vein=vessel - u(0, 30),
        portal=vessel - u(0, 20),
        myocardium=u(80, 120),
        heart_blood=vessel,
        adrenal=u(50, 80),
        muscle=muscle,
        bowel_wall=u(60, 100),
    )
