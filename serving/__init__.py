"""Ray Serve app for chatting with a fine-tuned model (`serve run serving:app`). Built in a later step."""
