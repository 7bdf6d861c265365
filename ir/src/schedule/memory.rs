//! The memory plan: offsets of intermediate buffers in one arena per device, reusing the
//! space of buffers that are dead.
//!
//! Owns [`MemoryPlan`] and the [`PlanMemory`] pass. Sizes are resolved under concrete
//! bindings (the pass's options); a buffer lives from the kernel that writes it to the last
//! kernel that reads it (`Buffer::lifetime`, views included). Placement is greedy by size
//! class: buffers sorted by size (largest first), each put at the lowest aligned offset that
//! does not overlap a placed buffer whose lifetime intersects its own. Only intermediates
//! are planned: inputs, state, outputs, weights and load-time results are owned by the
//! runtime. Host staging copies made by transfers are not planned here.

use super::pass::{Pass, PassReport};
use super::{BufferKind, Device, Schedule};
use crate::shape::Bindings;
use serde::{Deserialize, Serialize};

/// One planned buffer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub buffer: usize,
    pub offset: u64,
    pub bytes: u64,
}

/// The arena of one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arena {
    pub device: Device,
    /// Arena size with reuse.
    pub bytes: u64,
    /// The sum of the planned buffers' sizes (no reuse), for comparison.
    pub naive_bytes: u64,
    /// Slots in buffer order.
    pub slots: Vec<Slot>,
}

/// Offsets of the intermediate buffers under `bindings`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryPlan {
    pub bindings: Bindings,
    pub alignment: u64,
    pub arenas: Vec<Arena>,
}

/// Plans memory under concrete bindings. Options: `bindings`, `alignment`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanMemory {
    pub bindings: Bindings,
    /// Offset alignment in bytes (a power of two).
    pub alignment: u64,
}

impl Pass for PlanMemory {
    fn name(&self) -> &str {
        "plan_memory"
    }

    fn options(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("bindings serialise")
    }

    fn run(&self, schedule: &mut Schedule) -> PassReport {
        let mut report = PassReport::default();
        let mut plan = MemoryPlan {
            bindings: self.bindings.clone(),
            alignment: self.alignment,
            arenas: Vec::new(),
        };
        for device in [Device::Gpu, Device::Cpu] {
            let mut items = Vec::new();
            for buffer in &schedule.buffers {
                if buffer.kind != BufferKind::Intermediate {
                    continue;
                }
                let Some((first, last)) = buffer.lifetime else {
                    continue;
                };
                if schedule.kernels[first].device != device {
                    continue;
                }
                let bytes = match buffer.bytes.resolve(&self.bindings) {
                    Ok(b) => b.div_ceil(self.alignment) * self.alignment,
                    Err(e) => {
                        report.notes.push(format!("buffer {}: {e}", buffer.id));
                        continue;
                    }
                };
                items.push((buffer.id, first, last, bytes));
            }
            if items.is_empty() {
                continue;
            }
            let slots = greedy(&items);
            report.changed += slots.len();
            let naive = items.iter().map(|i| i.3).sum();
            let bytes = slots.iter().map(|s| s.offset + s.bytes).max().unwrap_or(0);
            report.notes.push(format!(
                "{device:?}: {} buffers in {bytes} bytes ({naive} without reuse)",
                slots.len()
            ));
            plan.arenas.push(Arena {
                device,
                bytes,
                naive_bytes: naive,
                slots,
            });
        }
        schedule.memory = Some(plan);
        report
    }
}

/// Greedy-by-size offset assignment of `(buffer, first, last, bytes)`; slots in buffer order.
fn greedy(items: &[(usize, usize, usize, u64)]) -> Vec<Slot> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(items[i].3), items[i].1, items[i].0));
    let mut placed: Vec<(usize, u64)> = Vec::new(); // (item, offset)
    for &i in &order {
        let (_, first, last, bytes) = items[i];
        let mut conflicts: Vec<(u64, u64)> = placed
            .iter()
            .filter(|(j, _)| items[*j].1 <= last && first <= items[*j].2)
            .map(|&(j, offset)| (offset, offset + items[j].3))
            .collect();
        conflicts.sort();
        let mut offset = 0;
        for (start, end) in conflicts {
            if offset + bytes <= start {
                break;
            }
            offset = offset.max(end);
        }
        placed.push((i, offset));
    }
    let mut slots: Vec<Slot> = placed
        .into_iter()
        .map(|(i, offset)| Slot {
            buffer: items[i].0,
            offset,
            bytes: items[i].3,
        })
        .collect();
    slots.sort_by_key(|s| s.buffer);
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_buffers_are_reused_and_live_ones_never_overlap() {
        // a: kernels 0–1, b: 1–2, c: 2–3 (a is dead when c is born).
        let items = [(0, 0, 1, 100), (1, 1, 2, 50), (2, 2, 3, 100)];
        let slots = greedy(&items);
        assert_eq!(slots[0].offset, 0);
        assert_eq!(slots[2].offset, 0, "c reuses a's space");
        assert_eq!(slots[1].offset, 100);
        for (i, a) in items.iter().enumerate() {
            for (j, b) in items.iter().enumerate().skip(i + 1) {
                if a.1 <= b.2 && b.1 <= a.2 {
                    let (x, y) = (&slots[i], &slots[j]);
                    assert!(x.offset + x.bytes <= y.offset || y.offset + y.bytes <= x.offset);
                }
            }
        }
    }
}
