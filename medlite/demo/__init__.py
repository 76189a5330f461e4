"""The built-in demo model: a micro TinyLLaVA-Med trained on first use on Micro Med-VQA (questions
about lesions drawn on the built-in medical images), cached, and used whenever no ``--model`` is given.

``medlite.demo.model.ensure_demo_model(ctx)`` returns its folder. See docs/demo-model.md.
"""
