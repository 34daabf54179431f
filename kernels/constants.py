"""The rasterizer's semantics constants (gsplat 1.5.3 classic) and the pair record layout, in one place.

Every other module of `kernels` reads them from here (the CUDA source gets the compositing ones as -D defines), so
a change of semantics is one edit, and this module imports nothing, so it sits at the bottom of the package.
"""

# Screen tiles: 16x16 pixels, composited as one unit (one program per camera x tile).
TILE = 16
TILE_PIXELS = TILE * TILE

# Projection (step 1).
EPS2D = 0.3  # added to the 2D covariance's diagonal
NEAR_PLANE = 0.01
FAR_PLANE = 1e10
MAX_EXTEND = 3.33  # the opacity-aware bounding box reaches at most 3.33 sigma
FRUSTUM_MARGIN = 0.3  # the Jacobian clamps x/z, y/z to the view frustum plus 30%

# Compositing (steps 3-4). ALPHA_MIN is also the projection's opacity cull and the bounding box's cut-off.
ALPHA_MIN = 1.0 / 255.0  # a pair with alpha below this is skipped
ALPHA_MAX = 0.999  # alpha is clamped here
T_EPSILON = 1e-4  # a pixel stops, exclusive, once T * (1 - alpha) <= T_EPSILON

# The pair record: mean2d (2), conic (3), opacity (1), then the features (colour (3), depth (1)).
MX, MY, CA, CB, CC, OPACITY, FEATURES = range(7)
NUM_FEATURES = 4
NUM_FIELDS = FEATURES + NUM_FEATURES
