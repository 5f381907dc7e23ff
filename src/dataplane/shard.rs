//! Sharding of a SNAT map: a tiling of the (source, destination) address plane into rectangular
//! cells, each with its own small kernel map.
//!
//! Why: the kernel's set backend for concatenated ranges (pipapo) deletes an element in time
//! linear in the size of its set (about 5 µs per element here), so one changed policy in a
//! 100 000-element map costs ~90 ms, and flushing a big map is quadratic. With cells of a few
//! hundred elements a change touches only small sets.
//!
//! The cells are chosen from the data when the whole map is loaded: source slices cut at source
//! group boundaries every `target` elements, and a source group larger than `target` (one source
//! range toward many destinations) gets a slice of its own cut along destinations. The cells
//! tile the plane exactly, so every packet lands in one cell. An element that spans several
//! cells (a wide range added later, or a source slice boundary falling inside it) is stored as
//! one piece per cell, the piece being its intersection with the cell.
//!
//! Addresses are `u128` here (IPv4 in the low 32 bits, `max` = the family's last address).

/// An inclusive range of addresses.
pub type Span = (u128, u128);

/// A rectangle: source range × destination range.
pub type Rect = (Span, Span);

#[derive(Debug, Clone, PartialEq, Eq)]
struct Slice {
    /// First source address; the slice ends where the next begins (the last at `max`).
    src_lo: u128,
    /// First destination address of each cell in the slice, ascending, starting at 0.
    dst_lo: Vec<u128>,
    /// Index of the slice's first cell.
    first_cell: usize,
}

/// A tiling of `[0, max] × [0, max]` into numbered cells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    max: u128,
    slices: Vec<Slice>,
    cells: usize,
}

impl Partition {
    /// One cell: the whole plane.
    pub fn whole(max: u128) -> Partition {
        Partition {
            max,
            slices: vec![Slice {
                src_lo: 0,
                dst_lo: vec![0],
                first_cell: 0,
            }],
            cells: 1,
        }
    }

    /// Cells of about `target` elements each for `elements` (sorted by source, then
    /// destination; they may overlap or be unsorted, which only costs more pieces).
    pub fn build(elements: &[Rect], target: usize, max: u128) -> Partition {
        let target = target.max(1);
        let mut cuts: Vec<(u128, Vec<u128>)> = Vec::new();
        // Start of the open slice (None: the plane is covered to `max` already), and how many
        // elements it holds.
        let mut open: Option<u128> = Some(0);
        let mut count = 0usize;
        let mut i = 0;
        while i < elements.len() {
            let src = elements[i].0;
            let mut j = i + 1;
            while j < elements.len() && elements[j].0 == src {
                j += 1;
            }
            let group = &elements[i..j];
            i = j;
            let Some(lo) = open else { break };
            let (a, b) = src;
            if group.len() > target {
                // A slice of exactly its own sources, cut along destinations: an element added
                // later from other sources then does not span all of its cells.
                if a > lo {
                    cuts.push((lo, vec![0]));
                    open = Some(a);
                }
                let start = open.unwrap_or(a);
                let mut dst_lo = vec![0u128];
                for k in (target..group.len()).step_by(target) {
                    let d = group[k].1.0;
                    if dst_lo.last().is_some_and(|&last| d > last) {
                        dst_lo.push(d);
                    }
                }
                cuts.push((start, dst_lo));
                open = b.checked_add(1).filter(|&n| n <= max && n > start);
                count = 0;
            } else {
                if count > 0 && count + group.len() > target && a > lo {
                    cuts.push((lo, vec![0]));
                    open = Some(a);
                    count = 0;
                }
                count += group.len();
            }
        }
        if let Some(lo) = open {
            cuts.push((lo, vec![0]));
        }
        let mut slices = Vec::with_capacity(cuts.len());
        let mut cells = 0;
        for (src_lo, dst_lo) in cuts {
            let n = dst_lo.len();
            slices.push(Slice {
                src_lo,
                dst_lo,
                first_cell: cells,
            });
            cells += n;
        }
        Partition { max, slices, cells }
    }

    /// Number of cells.
    pub fn len(&self) -> usize {
        self.cells
    }

    pub fn is_empty(&self) -> bool {
        self.cells == 0
    }

    fn slice_end(&self, i: usize) -> u128 {
        self.slices
            .get(i + 1)
            .map_or(self.max, |next| next.src_lo - 1)
    }

    /// Every cell as (index, rectangle), in index order.
    pub fn cells(&self) -> impl Iterator<Item = (usize, Rect)> + '_ {
        self.slices.iter().enumerate().flat_map(move |(i, s)| {
            let src = (s.src_lo, self.slice_end(i));
            s.dst_lo.iter().enumerate().map(move |(j, &d)| {
                let d_end = s.dst_lo.get(j + 1).map_or(self.max, |n| n - 1);
                (s.first_cell + j, (src, (d, d_end)))
            })
        })
    }

    /// Calls `f(cell, piece)` for each cell that `r` intersects, with the intersection.
    pub fn pieces(&self, r: Rect, mut f: impl FnMut(usize, Rect)) {
        let ((s0, s1), (d0, d1)) = r;
        let mut i = self
            .slices
            .partition_point(|s| s.src_lo <= s0)
            .saturating_sub(1);
        while i < self.slices.len() && self.slices[i].src_lo <= s1 {
            let s = &self.slices[i];
            let src = (s0.max(s.src_lo), s1.min(self.slice_end(i)));
            let mut j = s.dst_lo.partition_point(|&d| d <= d0).saturating_sub(1);
            while j < s.dst_lo.len() && s.dst_lo[j] <= d1 {
                let end = s.dst_lo.get(j + 1).map_or(self.max, |n| n - 1);
                f(s.first_cell + j, (src, (d0.max(s.dst_lo[j]), d1.min(end))));
                j += 1;
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: u128 = u32::MAX as u128;

    fn contains(r: Rect, p: (u128, u128)) -> bool {
        r.0.0 <= p.0 && p.0 <= r.0.1 && r.1.0 <= p.1 && p.1 <= r.1.1
    }

    /// The cells tile the plane: checked on every corner of every cell and its neighbours.
    fn check_tiling(p: &Partition) {
        let cells: Vec<_> = p.cells().collect();
        assert_eq!(cells.len(), p.len());
        for (k, (i, _)) in cells.iter().enumerate() {
            assert_eq!(*i, k);
        }
        let mut probes = vec![(0, 0), (MAX, MAX), (0, MAX), (MAX, 0)];
        for (_, ((a, b), (c, d))) in &cells {
            for s in [*a, *b, a.saturating_sub(1), (b + 1).min(MAX)] {
                for t in [*c, *d, c.saturating_sub(1), (d + 1).min(MAX)] {
                    probes.push((s, t));
                }
            }
        }
        for pt in probes {
            let n = cells.iter().filter(|(_, r)| contains(*r, pt)).count();
            assert_eq!(n, 1, "{pt:?} is in {n} cells");
        }
    }

    fn sources(n: u128) -> Vec<Rect> {
        (0..n).map(|i| ((1000 + i, 1000 + i), (0, MAX))).collect()
    }

    #[test]
    fn whole_and_empty() {
        let p = Partition::whole(MAX);
        assert_eq!(p.len(), 1);
        check_tiling(&p);
        assert_eq!(Partition::build(&[], 10, MAX), p);
    }

    #[test]
    fn many_sources_are_cut_between_groups() {
        let els = sources(1000);
        let p = Partition::build(&els, 100, MAX);
        assert_eq!(p.len(), 10);
        check_tiling(&p);
        let mut per_cell = vec![0; p.len()];
        for e in &els {
            let mut n = 0;
            p.pieces(*e, |c, piece| {
                assert_eq!(piece, *e, "a source cut never splits an element");
                per_cell[c] += 1;
                n += 1;
            });
            assert_eq!(n, 1);
        }
        assert!(per_cell.iter().all(|&c| c == 100), "{per_cell:?}");
    }

    #[test]
    fn one_source_many_destinations_is_cut_along_destinations() {
        let els: Vec<Rect> = (0..1000u128)
            .map(|i| ((10, 20), (i * 256, i * 256 + 255)))
            .collect();
        let p = Partition::build(&els, 100, MAX);
        assert_eq!(
            p.len(),
            1 + 10 + 1,
            "the sources before, ten destination cells, the sources after"
        );
        check_tiling(&p);
        let mut per_cell = vec![0; p.len()];
        for e in &els {
            p.pieces(*e, |c, piece| {
                assert_eq!(piece, *e);
                per_cell[c] += 1;
            });
        }
        assert_eq!(per_cell.iter().filter(|&&c| c == 100).count(), 10);
        // An element from another source lands in one cell, not in the ten.
        let mut n = 0;
        p.pieces(((5, 5), (0, MAX)), |_, _| n += 1);
        assert_eq!(n, 1);
    }

    #[test]
    fn the_last_address_and_a_group_reaching_it() {
        let mut els = sources(10);
        els.push(((MAX - 5, MAX), (0, 7)));
        els.push(((MAX - 5, MAX), (8, MAX)));
        let p = Partition::build(&els, 1, MAX);
        check_tiling(&p);
        let mut big: Vec<Rect> = (0..5).map(|i| ((MAX, MAX), (i, i))).collect();
        big.insert(0, ((0, 0), (0, 0)));
        let p = Partition::build(&big, 2, MAX);
        check_tiling(&p);
    }

    #[test]
    fn a_wide_element_is_split_into_one_piece_per_cell() {
        let p = Partition::build(&sources(1000), 100, MAX);
        let mut pieces = Vec::new();
        p.pieces(((0, MAX), (5, 9)), |c, r| pieces.push((c, r)));
        assert_eq!(pieces.len(), p.len());
        for (c, r) in &pieces {
            let (_, cell) = p.cells().nth(*c).unwrap();
            assert_eq!(r.0, cell.0);
            assert_eq!(r.1, (5, 9));
        }
    }

    fn rect() -> impl Strategy<Value = Rect> {
        let span = (0u128..64, 0u128..64).prop_map(|(a, b)| (a.min(b) * 4, a.max(b) * 4 + 3));
        (span.clone(), span)
    }

    proptest! {
        /// For any elements: the cells tile the plane, every piece lies in its cell and in its
        /// element, and a point of an element is in exactly one of its pieces.
        #[test]
        fn pieces_cover_exactly(mut els in prop::collection::vec(rect(), 0..60), target in 1usize..8, probe in prop::collection::vec((0u128..260, 0u128..260), 20)) {
            els.sort();
            let max = 255;
            let p = Partition::build(&els, target, max);
            let cells: Vec<_> = p.cells().collect();
            for pt in &probe {
                if pt.0 <= max && pt.1 <= max {
                    prop_assert_eq!(cells.iter().filter(|(_, r)| contains(*r, *pt)).count(), 1);
                }
            }
            for e in &els {
                let mut pieces = Vec::new();
                p.pieces(*e, |c, r| pieces.push((c, r)));
                for (c, r) in &pieces {
                    prop_assert!(r.0.0 <= r.0.1 && r.1.0 <= r.1.1);
                    let cell = cells[*c].1;
                    prop_assert!(contains(cell, (r.0.0, r.1.0)) && contains(cell, (r.0.1, r.1.1)));
                    prop_assert!(contains(*e, (r.0.0, r.1.0)) && contains(*e, (r.0.1, r.1.1)));
                }
                for pt in &probe {
                    let inside = contains(*e, *pt);
                    let n = pieces.iter().filter(|(_, r)| contains(*r, *pt)).count();
                    prop_assert_eq!(n, usize::from(inside));
                }
            }
        }
    }
}
