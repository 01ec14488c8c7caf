"""Synthetic abdominal CT phantoms in the Medical Segmentation Decathlon layout.

The only training data the project can rely on offline. Each case is an axial CT-like volume in
Hounsfield units (int16) with an exact spleen label (uint8, spleen only):

- body wall (fat, muscle), spine with canal, paraspinal muscles, ribs, aorta and IVC; the CT couch
  under the patient and, in a third of cases, the arms down beside the body (`body`);
- above the spleen: diaphragm domes, lung bases with posterior recesses, heart and mediastinum
  (`thorax`);
- around it: liver with portal branches, kidneys with medulla and sinus, left adrenal, stomach (fluid,
  food or oral contrast, gas cap), pancreas whose tail reaches the splenic hilum, splenic artery and
  vein, splenic flexure and descending colon (gas, stool, contrast), bowel loops, bladder, sometimes
  ascites (`organs`);
- the spleen itself: 25-2500 ml (small to splenomegaly), ellipsoid or crescent, sometimes touching
  the kidney or stomach, clipped under the diaphragm, with lesions sometimes (`spleen`);
- contrast phase per case: portal-venous, non-contrast (spleen 40-60 HU, darker than liver) or
  arterial (heterogeneous zebra spleen) (`contrast`);
- partial-volume blur, correlated noise, streaks from dense contrast and arms (`artefacts`);
- geometry `compact` (small grids, the default) or `clinical` (0.6-1.0 mm in-plane, 300-500 mm
  scans from the lung bases to the pelvis), RAS, LPS and LAS affines (`geometry`).

Anatomy is defined in millimetres in RAS+ world space (NIfTI convention: +x towards the patient's
right, +y anterior, +z superior) and then sampled on the voxel grid, so spacing and size can vary
freely. The spleen, on the patient's left, therefore has x < 0 and the liver x > 0.
"""

from .case import ORIENTATIONS, Case, generate_case
from .contrast import PHASES
from .dataset import write_dataset, write_nifti
from .geometry import GEOMETRIES

__all__ = ["GEOMETRIES", "ORIENTATIONS", "PHASES", "Case", "generate_case", "write_dataset", "write_nifti"]
