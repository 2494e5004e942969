"""The numbers every stage agrees on: patch geometry and the Kaggle file-name pattern."""

import re

# Patches are 50x50 px cut on a 50-px grid; coordinates in names are 1-based
# (x, y = 1, 51, 101, ...), and a patch covers slide pixels [x-1, x+49) x [y-1, y+49).
PATCH_SIZE = 50
GRID_STEP = 50
COORD_ORIGIN = 1

# No slide is larger than this (500 mm at 40x): a coordinate beyond it is a broken name,
# not a place on a slide.
MAX_SLIDE_PX = 2_000_000

# Edge patches are padded with white: background on a bright-field slide is white.
BACKGROUND_RGB = (255, 255, 255)

PATCH_NAME_PATTERN = re.compile(
    r"^(?P<patient>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])\.png$"
)
# Slide ids become folder and file names in reports: letters, digits, dot, underscore and
# dash, starting with a letter or digit (so never "." or "..").
SAFE_SLIDE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PATCH_NAME_TEMPLATE = "{patient}_idx5_x{x}_y{y}_class{label}.png"
PATCH_NAME_HINT = "<patient>_idx5_x<X>_y<Y>_class<0|1>.png"

# The Kaggle archive repeats the whole set under this folder.
KAGGLE_DUPLICATE_FOLDER = "IDC_regular_ps50_idx5"

# Patient ids of generated slides start here, far from every real id, so synthetic
# patches can never be mistaken for real ones.
SYNTHETIC_PATIENT_BASE = 900000

# Micrometres per pixel of the Kaggle patches: slides scanned at 40x (about 0.25 um/px)
# and downsampled 16 times to 2.5x (Janowczyk & Madabhushi 2016). Approximate.
KAGGLE_UM_PER_PX = 4.0

# The ONNX opset models are exported at (part of the graph cache's key).
ONNX_OPSET = 17
