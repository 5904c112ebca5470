"""The method: lesions, the tracking loop, prompt choice, confidence, measurements and RECIST 1.1."""
