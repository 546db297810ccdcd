"""
The evaluation: what evaluate.py reports and what a run logs while it trains. measures holds the
figures that need no judge (PSNR, SSIM, a generator's loss on held-out codes); watch, what train.py
samples and measures at each image_every; stories, the judged stories, long videos and the Animals
extras; motion, the motion probe and the continuation of real clips. Everything here that judges a
clip reads it with a world's oracle or judge (worlds/).
"""
