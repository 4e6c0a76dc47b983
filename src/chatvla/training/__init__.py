"""Training: recorded episodes -> a two-stage ChatVLA-2 checkpoint that `chatvla serve --model DIR` serves.

    labels.py    what the model should say about a task (reasoning text, image-text questions), and
                 how to judge what it said; torch-free
    data.py      recordings and rendered scenes -> samples (images, state, action chunk, texts)
    batches.py   samples -> model inputs (prompt + target token ids, pixel patches, loss masks)
    stages.py    the two training stages, checkpointing and resuming
    evaluate.py  closed-loop evaluation through a real server process and the robot client stack
"""
