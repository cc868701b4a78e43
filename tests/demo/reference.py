"""Ground truth written in the tests, not imported from the code under test: the hues the palette names must be
nearest to, and the names of the 3x3 layout's cells."""

REFERENCE_RGB = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 220, 0),
                 "purple": (128, 0, 160), "orange": (255, 140, 0)}
POSITION_NAMES = [["top left", "top", "top right"], ["left", "center", "right"],
                  ["bottom left", "bottom", "bottom right"]]


def nearest_name(rgb):
    return min(REFERENCE_RGB, key=lambda k: sum((a - b) ** 2 for a, b in zip(rgb, REFERENCE_RGB[k])))
