"""Exercise 11's grader passes right answers, written here without the course's backend (a loop
over the experts, and one over the K choices), and FAILS known wrong answers, each on several
seeds with the message that names its mistake: gate and up halves swapped, the routing weights
left out, pairs routed to no expert (id E) not left out, a weight read the wrong way round, the
weights detached, the output computed under no_grad, the course's own backend called; in a
model, a wrong backend fails against eager. The unfilled cell says "not implemented yet"."""

import torch
import torch.nn.functional as F

from moe_course import hf
from moe_course.graders import ex11_experts_backend as ex11

from grader_checks import must_fail, must_pass, unfilled


def experts_ok(self, x, ids, weights, *, swap=False, weighted=True, transpose_down=False, detach=False):
    E = self.gate_up_proj.shape[0]
    gate_up, down = (self.gate_up_proj.detach(), self.down_proj.detach()) if detach else (self.gate_up_proj,
                                                                                          self.down_proj)
    out = torch.zeros_like(x)
    for e in range(E):
        token, choice = (ids == e).nonzero(as_tuple=True)
        gate, up = (x[token] @ gate_up[e].T).chunk(2, dim=-1)
        a = F.silu(up) * gate if swap else F.silu(gate) * up
        y = a @ (down[e] if transpose_down else down[e].T)
        out = out.index_add(0, token, y * weights[token, choice, None] if weighted else y)
    return out


def experts_by_choice(self, x, ids, weights, *, leave_out_unrouted=True):  # right: a loop over the K choices
    E = self.gate_up_proj.shape[0]
    out = torch.zeros_like(x)
    for j in range(ids.shape[1]):
        routed = ids[:, j] < E
        e = ids[:, j].clamp(max=E - 1) if leave_out_unrouted else ids[:, j]
        h = torch.einsum("th,tmh->tm", x, self.gate_up_proj[e])
        gate, up = h.chunk(2, dim=-1)
        y = torch.einsum("ti,thi->th", F.silu(gate) * up, self.down_proj[e])
        out = out + torch.where(routed[:, None], y * weights[:, j, None], 0)
    return out


def under_no_grad(self, x, ids, weights):
    with torch.no_grad():
        return experts_ok(self, x, ids, weights)


def test_the_experts_forward_grader():
    must_pass(ex11.grade_experts_forward, experts_ok)
    must_pass(ex11.grade_experts_forward, experts_by_choice)
    must_fail(ex11.grade_experts_forward, lambda *a: experts_ok(*a, swap=True), "halves of gate_up_proj are swapped")
    must_fail(ex11.grade_experts_forward, lambda *a: experts_ok(*a, weighted=False), "routing weights are not applied")
    must_fail(ex11.grade_experts_forward, lambda *a: experts_by_choice(*a, leave_out_unrouted=False),
              "routed to no expert")
    must_fail(ex11.grade_experts_forward, lambda *a: experts_ok(*a, transpose_down=True), "their transpose")
    must_fail(ex11.grade_experts_forward, lambda *a: experts_ok(*a, detach=True), "no gradient reaches gate_up_proj")
    must_fail(ex11.grade_experts_forward, under_no_grad, "no gradient flows back")
    must_fail(ex11.grade_experts_forward, lambda *a: None, "got None")
    must_fail(ex11.grade_experts_forward, lambda self, x, i, w: x, "relative error")
    must_fail(ex11.grade_experts_forward, hf.experts_forward, "course's own")
    must_fail(ex11.grade_experts_forward, unfilled, "not implemented yet")


def test_the_in_a_model_grader():
    must_pass(ex11.grade_in_a_model, experts_ok, seeds=(0, None))
    must_fail(ex11.grade_in_a_model, lambda *a: experts_ok(*a, swap=True), "logits", seeds=(0,))
    must_fail(ex11.grade_in_a_model, lambda *a: experts_ok(*a, detach=True), "no gradient reaches", seeds=(0,))
