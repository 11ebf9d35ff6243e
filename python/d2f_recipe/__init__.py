"""The D2F recipe on small models, on a task with exact answers (grade-school math word problems).

Each step is a module run with ``python -m d2f_recipe.<step>``: ``train_ar`` (the autoregressive
baseline, which also trains the shared tokenizer), ``adapt_ar`` (the diffusion teacher adapted from
it, Dream's way), ``train_teacher`` (a LLaDA teacher from scratch instead), ``distill`` (the D2F
student by asymmetric distillation), ``tune`` (decoding thresholds on validation problems) and
``evaluate`` (the held-out table against the AR model). ``task_math`` makes the problems,
``tokenizer_math`` the tokenizer, ``training`` holds the loop they share.
"""
