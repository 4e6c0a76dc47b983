"""The robot-side client: policy connection, chunk executor, safety filter, robot adapters, sims.

Nothing under `chatvla.client` imports torch; a test proves it in a fresh interpreter.
"""
