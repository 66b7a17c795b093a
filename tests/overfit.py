"""The overfit loop of the detector tests: full-batch AdamW with one tenfold lr drop, scored every 25 steps."""

import torch


def overfit(model, criterion, batch, targets, score, lr, max_steps, drop_at, weight_decay, target=0.9):
    """Train `model` on one batch until `score(model)` (called in eval mode, without gradients) reaches `target`
    or `max_steps` pass; the lr drops tenfold after `drop_at` steps. Returns (best score, steps run)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [drop_at], 0.1)
    best = 0.0
    for step in range(1, max_steps + 1):
        model.train()
        loss = sum(criterion.weighted(criterion(model(batch, targets), targets)).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0:
            model.eval()
            with torch.no_grad():
                best = max(best, score(model))
            if best >= target:
                break
    return best, step
