"""What the scripts share, one concern a module (each imported only by what uses it):

    chat         the chat tokens, the template, turns as text, the preview prompts
    word_limits  counting words as IFEval does, the limit phrasings, reading a limit back
    rewards      GRPO's reward functions and their weights
    pairs        DPO's preference pairs: reading, tokenising as TRL does, preference accuracy
    errors       InputError / RunFault: one line on stderr, no traceback
    files        the JSONL reader, atomic writes, checks of output paths and model folders
    recipes      reading and checking YAML recipes, with file:line
    args         the one argument path: recipe + flags -> the scripts' dataclasses
    model        Phi-2 in 4-bit with the chat tokens, adapters, the stack's fixes
    rollouts     the fast Phi-2 decoder (GRPO's rollouts, the previews)
    answers      greedy answers to prompts (previews, evaluation, export check, demo)
    training     the output directory, complete checkpoints, the guard, the curves
"""
