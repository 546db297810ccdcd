"""
The procedural worlds, by the name `--data` gives them.

A world renders captioned clips on the fly, so that everything trains and is measured with no
download, and reads its own attributes back from pixels, so that "does the video match the text?"
becomes a number. Both worlds' modules offer what train.py, sample.py and evaluate.py ask of a world
by its name:

    random_spec(rng) -> spec    what one clip shows (a dataclass of attributes)
    caption(spec) -> str        its canonical caption ("a red circle moving right")
    KEEP_AT_CUT                 latent frames of context a story keeps at a cut (None: all of them)

Their clip sources (`ShapesSource`, `AnimalsSource`) are made by `data.make_source`, beside real
data, and their readers of pixels (`shapes.oracle`, `animals.judge`) are called by evaluate.py.
"""

from worlds import animals, shapes

# a world's name -> its module
WORLDS = {"shapes": shapes, "animals": animals}
# a world's name -> its clip source, (frames, size, seed) -> clips and captions
SOURCES = {"shapes": shapes.ShapesSource, "animals": animals.AnimalsSource}
