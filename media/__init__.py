"""
Video files and folders, the layer under everything: decoding with PyAV (resampled by timestamp,
resized, cropped, rotation and mirroring undone) and writing .mp4 and .gif (video), and listing a
folder's files with their captions, from captions.csv or label sub-folders, before anything is
decoded (folders). Both bound what one file or one pattern may ask of a loader.
"""
