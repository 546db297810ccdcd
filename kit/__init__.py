"""
The machinery behind the method: configs and their checks (config, checks), checkpoint files
(checkpoint), the run folder and resume (runs), the training step's bookkeeping (steps), signals
and exit codes (faults), progress lines and logs (progress), DDP and FSDP (distributed), where
commands write (outputs), the stream of clips and the token cache (stream), folding a finished
codebook (fold), and reading video files and folders (video, folders). None of it is needed to
learn how Phenaki works; train.py, sample.py and evaluate.py import what they use from each module.

This door is what the method (data.py) and the worlds take from the machinery: reading a video file
and listing a folder of captioned clips.
"""

from kit.faults import UnusableData
from kit.folders import CAPTION_CHARS, expand_braces, folder_items, holds_videos, say_skipped
from kit.video import (CROPS, IMAGE_EXTS, MAX_BYTES, VIDEO_EXTS, read_video, to_uint8_frames,
                       video_seconds)
