"""Helpers for the vision-language tests: expected strings (written out, independent of the code), images, records."""

from PIL import Image

# the assistant turn as each family's chat template writes it: content and end-of-turn
ASSISTANT_TURN = {"llava": "{}<|im_end|>\n", "idefics3": " {}<end_of_utterance>\n", "gemma3": "{}<end_of_turn>\n"}
# image tokens each tiny model puts in input_ids per image
IMAGE_TOKENS = {"llava": 16, "idefics3": 4, "gemma3": 4}


def square(colour=(214, 39, 40), size=32):
    image = Image.new("RGB", (size, size), (240, 240, 240))
    image.paste(colour, (4, 4, size - 4, size - 4))
    return image


def chat(*turns, images=()):
    """A record from (role, content) pairs; "<img>" in a content string becomes an image part."""
    messages, k = [], 0
    for role, content in turns:
        if "<img>" in content:
            parts = []
            for i, piece in enumerate(content.split("<img>")):
                if i:
                    parts.append({"type": "image", "image": images[k]})
                    k += 1
                if piece:
                    parts.append({"type": "text", "text": piece})
            content = parts
        messages.append({"role": role, "content": content})
    return {"messages": messages}
