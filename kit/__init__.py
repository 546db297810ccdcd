"""
The machinery behind the method, none of it needed to learn how Phenaki works: configs and presets
(config), checkpoint files and the checks made before anything is built from one (checkpoint), the
run folder and resume (runs), a training step's bookkeeping (steps), errors, signals and exit codes
(faults), progress lines and logs (progress), DDP and FSDP (distributed), where commands write
(outputs), the clip stream and the token cache (stream), and folding a finished codebook (fold).
train.py, sample.py and evaluate.py import what they use from each module; the method imports none
of it.
"""
