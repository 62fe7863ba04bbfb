"""Distil a torchvision ResNet-18 teacher into a small student on your own image folder, in a plain PyTorch
loop, with the learned operator as the optimizer: it takes the steps and chooses (beta_t, T_t) of the KD loss.

    python examples/distil_your_model.py --data DIR        # DIR/<class>/*.jpg|png (or DIR/train/<class>/...)

The teacher is trained here first (a few epochs; pass --teacher-weights FILE for a state_dict of your own).
"""

import argparse
import itertools
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, models, transforms
from tqdm import tqdm

from l2o_kd import LearnedOptimizer, kd_loss

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--data", required=True, help="an ImageFolder tree: class folders of images")
ap.add_argument("--steps", type=int, default=500, help="student steps")
ap.add_argument("--teacher-epochs", type=int, default=3)
ap.add_argument("--teacher-weights", default=None, help="a state_dict of torchvision's resnet18 with this many classes")
ap.add_argument("--batch-size", type=int, default=64)
args = ap.parse_args()
torch.manual_seed(0)

root = Path(args.data) / "train" if (Path(args.data) / "train").is_dir() else Path(args.data)
data = datasets.ImageFolder(root, transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor(),
                                                      transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))]))
loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=len(data) > args.batch_size)
classes = len(data.classes)

teacher = models.resnet18(num_classes=classes)
if args.teacher_weights:
    teacher.load_state_dict(torch.load(args.teacher_weights, weights_only=True))
else:  # a teacher of your own: plain cross-entropy training
    opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9)
    for x, y in tqdm((b for _ in range(args.teacher_epochs) for b in loader), total=args.teacher_epochs * len(loader), desc="teacher"):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
teacher.eval()

student = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(32, classes))
opt = LearnedOptimizer(student.parameters(), total_steps=args.steps)  # the shipped operator
batches = (b for _ in itertools.count() for b in loader)  # epochs, each reshuffled
bar = tqdm(itertools.islice(batches, args.steps), total=args.steps, desc="student")
for x, y in bar:
    beta, temperature = opt.kd  # what the operator chose for this batch
    with torch.no_grad():
        t_logits = teacher(x)
    terms = kd_loss(student(x), t_logits, y, beta, temperature)
    opt.zero_grad()
    terms.total.backward()
    opt.step(loss=terms)
    bar.set_postfix(loss=f"{terms.total.item():.3f}", beta=f"{beta:.2f}", T=f"{temperature:.1f}")

student.eval()
with torch.no_grad():
    correct = sum(int((student(x).argmax(1) == y).sum()) for x, y in loader)
print(f"student train accuracy {correct / len(data):.3f} after {args.steps} steps; last beta {beta:.3f}, T {temperature:.2f}")
