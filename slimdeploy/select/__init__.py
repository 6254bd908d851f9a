"""Selection: the target (target), importance from the search (importance), the solver against a cost
(solver), ViT-Slim's rule and uniform widths (vitslim), candidate structures and their measured scores
(candidates, scoring), the closed measurement loop (loop) and the stage itself (stage)."""
