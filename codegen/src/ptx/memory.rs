//! Memory instructions: loads and stores (global and shared, scalar, vector and narrow,
//! with cache hints), asynchronous copies `cp.async`, and atomics (`atom`, `red`).
//!
//! Owns the [`Load`] / [`Store`] qualifier sets and their validation. Addresses are
//! [`Mem`] operands built elsewhere (`reg.at(offset)`, `array.at(offset)`); no address
//! arithmetic here.

use super::builder::KernelBuilder;
use super::types::{
    AtomicAdd, AtomicBits, AtomicMinMax, Integer, Mem, Operand, Reg, RegType, Scalar, U32,
};

/// A state space of memory instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    Global,
    Shared,
}

impl Space {
    fn ptx(self) -> &'static str {
        match self {
            Space::Global => "global",
            Space::Shared => "shared",
        }
    }
}

/// A cache operator of a global load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoadCache {
    /// `.ca`: cache in L1 and L2 (the default).
    AllLevels,
    /// `.cg`: cache in L2 only, bypassing L1.
    Global,
    /// `.cs`: streaming, likely accessed once.
    Streaming,
    /// `.lu`: last use.
    LastUse,
    /// `.cv`: do not cache; fetch again.
    Volatile,
}

impl LoadCache {
    fn ptx(self) -> &'static str {
        match self {
            LoadCache::AllLevels => "ca",
            LoadCache::Global => "cg",
            LoadCache::Streaming => "cs",
            LoadCache::LastUse => "lu",
            LoadCache::Volatile => "cv",
        }
    }
}

/// A cache operator of a global store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StoreCache {
    /// `.wb`: write back (the default).
    WriteBack,
    /// `.cg`: cache in L2 only.
    Global,
    /// `.cs`: streaming, likely accessed once.
    Streaming,
    /// `.wt`: write through to system memory.
    WriteThrough,
}

impl StoreCache {
    fn ptx(self) -> &'static str {
        match self {
            StoreCache::WriteBack => "wb",
            StoreCache::Global => "cg",
            StoreCache::Streaming => "cs",
            StoreCache::WriteThrough => "wt",
        }
    }
}

/// An L1 eviction priority (`.L1::evict_first`, …), sm_70 and newer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L1Eviction {
    Normal,
    Unchanged,
    First,
    Last,
    NoAllocate,
}

impl L1Eviction {
    fn ptx(self) -> &'static str {
        match self {
            L1Eviction::Normal => "L1::evict_normal",
            L1Eviction::Unchanged => "L1::evict_unchanged",
            L1Eviction::First => "L1::evict_first",
            L1Eviction::Last => "L1::evict_last",
            L1Eviction::NoAllocate => "L1::no_allocate",
        }
    }
}

/// An L2 prefetch size hint of a global load (`.L2::128B`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L2Prefetch {
    Bytes64,
    Bytes128,
    Bytes256,
}

impl L2Prefetch {
    fn ptx(self) -> &'static str {
        match self {
            L2Prefetch::Bytes64 => "L2::64B",
            L2Prefetch::Bytes128 => "L2::128B",
            L2Prefetch::Bytes256 => "L2::256B",
        }
    }
}

/// The qualifiers of a load: its space and optional cache hints.
///
/// ```
/// use kiln_codegen::ptx::{L2Prefetch, Load};
/// // ld.global.nc.L2::128B: read-only data, prefetching 128 bytes into L2
/// let weights = Load::GLOBAL.non_coherent().l2_prefetch(L2Prefetch::Bytes128);
/// # let _ = weights;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Load {
    space: Space,
    cache: Option<LoadCache>,
    non_coherent: bool,
    l1: Option<L1Eviction>,
    l2_prefetch: Option<L2Prefetch>,
}

impl Load {
    /// `ld.global`.
    pub const GLOBAL: Load = Load {
        space: Space::Global,
        cache: None,
        non_coherent: false,
        l1: None,
        l2_prefetch: None,
    };
    /// `ld.shared`.
    pub const SHARED: Load = Load {
        space: Space::Shared,
        ..Load::GLOBAL
    };

    /// `.nc`: through the read-only (non-coherent) path; only for data no thread of the
    /// kernel writes.
    pub fn non_coherent(self) -> Load {
        Load {
            non_coherent: true,
            ..self
        }
    }

    /// A cache operator (`.ca`, `.cg`, …).
    pub fn cache(self, cache: LoadCache) -> Load {
        Load {
            cache: Some(cache),
            ..self
        }
    }

    /// An L1 eviction priority.
    pub fn l1(self, eviction: L1Eviction) -> Load {
        Load {
            l1: Some(eviction),
            ..self
        }
    }

    /// An L2 prefetch size hint.
    pub fn l2_prefetch(self, size: L2Prefetch) -> Load {
        Load {
            l2_prefetch: Some(size),
            ..self
        }
    }

    /// `ld.<space>{.cop}{.nc}{.L1::…}{.L2::…}{.vN}.<type>`.
    fn opcode(&self, vector: usize, data: &str) -> String {
        let mut op = format!("ld.{}", self.space.ptx());
        if self.space == Space::Shared {
            assert!(
                self.cache.is_none()
                    && !self.non_coherent
                    && self.l1.is_none()
                    && self.l2_prefetch.is_none(),
                "ld.shared takes no cache hints ({self:?})"
            );
        }
        assert!(
            self.cache.is_none() || self.l1.is_none(),
            "ld: a cache operator and an L1 eviction priority cannot be combined ({self:?})"
        );
        if let Some(cache) = self.cache {
            assert!(
                !self.non_coherent
                    || matches!(
                        cache,
                        LoadCache::AllLevels | LoadCache::Global | LoadCache::Streaming
                    ),
                "ld.global.nc takes only the .ca, .cg or .cs cache operator ({self:?})"
            );
            op += ".";
            op += cache.ptx();
        }
        if self.non_coherent {
            op += ".nc";
        }
        if let Some(l1) = self.l1 {
            op += ".";
            op += l1.ptx();
        }
        if let Some(size) = self.l2_prefetch {
            op += ".";
            op += size.ptx();
        }
        if vector > 1 {
            op += &format!(".v{vector}");
        }
        op + "." + data
    }
}

/// The qualifiers of a store: its space and optional cache hints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Store {
    space: Space,
    cache: Option<StoreCache>,
    l1: Option<L1Eviction>,
}

impl Store {
    /// `st.global`.
    pub const GLOBAL: Store = Store {
        space: Space::Global,
        cache: None,
        l1: None,
    };
    /// `st.shared`.
    pub const SHARED: Store = Store {
        space: Space::Shared,
        ..Store::GLOBAL
    };

    /// A cache operator (`.cs` for output read by no later kernel soon, …).
    pub fn cache(self, cache: StoreCache) -> Store {
        Store {
            cache: Some(cache),
            ..self
        }
    }

    /// An L1 eviction priority.
    pub fn l1(self, eviction: L1Eviction) -> Store {
        Store {
            l1: Some(eviction),
            ..self
        }
    }

    fn opcode(&self, vector: usize, data: &str) -> String {
        let mut op = format!("st.{}", self.space.ptx());
        assert!(
            self.space == Space::Global || (self.cache.is_none() && self.l1.is_none()),
            "st.shared takes no cache hints ({self:?})"
        );
        assert!(
            self.cache.is_none() || self.l1.is_none(),
            "st: a cache operator and an L1 eviction priority cannot be combined ({self:?})"
        );
        if let Some(cache) = self.cache {
            op += ".";
            op += cache.ptx();
        }
        if let Some(l1) = self.l1 {
            op += ".";
            op += l1.ptx();
        }
        if vector > 1 {
            op += &format!(".v{vector}");
        }
        op + "." + data
    }
}

/// The memory width of a narrow integer load or store into a 32-bit register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Narrow {
    U8,
    S8,
    U16,
    S16,
}

impl Narrow {
    fn ptx(self) -> &'static str {
        match self {
            Narrow::U8 => "u8",
            Narrow::S8 => "s8",
            Narrow::U16 => "u16",
            Narrow::S16 => "s16",
        }
    }
}

fn register_list<T: RegType>(registers: &[Reg<T>]) -> String {
    let names: Vec<String> = registers.iter().map(|r| r.to_string()).collect();
    format!("{{{}}}", names.join(", "))
}

/// Checks the shape of a vector access at compile time: 2 or 4 lanes, at most 16 bytes.
const fn check_vector<T: RegType, const N: usize>() {
    assert!(N == 2 || N == 4, "vector accesses have 2 or 4 lanes");
    assert!(
        N as u32 * T::BITS <= 128,
        "vector accesses move at most 16 bytes"
    );
}

impl KernelBuilder {
    /// `ld`: one value of type `T`.
    pub fn ld<T: Scalar>(&mut self, load: Load, address: impl Into<Mem>) -> Reg<T> {
        let address = address.into();
        let d = self.reg::<T>();
        let opcode = load.opcode(1, T::DATA);
        self.emit(format!("{opcode} {d}, {address}"));
        d
    }

    /// `ld.global` with no hints.
    pub fn ld_global<T: Scalar>(&mut self, address: impl Into<Mem>) -> Reg<T> {
        self.ld(Load::GLOBAL, address)
    }

    /// `ld.shared`.
    pub fn ld_shared<T: Scalar>(&mut self, address: impl Into<Mem>) -> Reg<T> {
        self.ld(Load::SHARED, address)
    }

    /// `ld.vN`: `N` (2 or 4) consecutive values, at most 16 bytes, from an address aligned
    /// to the whole vector (`k.ld_vector::<U32, 4>(Load::GLOBAL, p)` is one 16-byte load).
    pub fn ld_vector<T: Scalar, const N: usize>(
        &mut self,
        load: Load,
        address: impl Into<Mem>,
    ) -> [Reg<T>; N] {
        const { check_vector::<T, N>() };
        let address = address.into();
        let d = self.regs::<T, N>();
        let opcode = load.opcode(N, T::DATA);
        self.emit(format!("{opcode} {}, {address}", register_list(&d)));
        d
    }

    /// `ld.u8` / `ld.s16` / …: a narrow integer, zero- or sign-extended into a 32-bit
    /// register.
    pub fn ld_narrow<T: Integer>(
        &mut self,
        load: Load,
        width: Narrow,
        address: impl Into<Mem>,
    ) -> Reg<T> {
        const { assert!(T::BITS == 32, "narrow loads extend into 32-bit registers") };
        let address = address.into();
        let d = self.reg::<T>();
        let opcode = load.opcode(1, width.ptx());
        self.emit(format!("{opcode} {d}, {address}"));
        d
    }

    /// `st`: one value.
    pub fn st<T: Scalar>(&mut self, store: Store, address: impl Into<Mem>, value: Reg<T>) {
        let address = address.into();
        let opcode = store.opcode(1, T::DATA);
        self.emit(format!("{opcode} {address}, {value}"));
    }

    /// `st.global` with no hints.
    pub fn st_global<T: Scalar>(&mut self, address: impl Into<Mem>, value: Reg<T>) {
        self.st(Store::GLOBAL, address, value)
    }

    /// `st.shared`.
    pub fn st_shared<T: Scalar>(&mut self, address: impl Into<Mem>, value: Reg<T>) {
        self.st(Store::SHARED, address, value)
    }

    /// `st.vN`: `N` (2 or 4) consecutive values, at most 16 bytes, to an address aligned
    /// to the whole vector.
    pub fn st_vector<T: Scalar, const N: usize>(
        &mut self,
        store: Store,
        address: impl Into<Mem>,
        values: [Reg<T>; N],
    ) {
        const { check_vector::<T, N>() };
        let address = address.into();
        let opcode = store.opcode(N, T::DATA);
        self.emit(format!("{opcode} {address}, {}", register_list(&values)));
    }

    /// `st.u8` / `st.u16` / …: the low bits of a 32-bit register.
    pub fn st_narrow<T: Integer>(
        &mut self,
        store: Store,
        width: Narrow,
        address: impl Into<Mem>,
        value: Reg<T>,
    ) {
        const { assert!(T::BITS == 32, "narrow stores take 32-bit registers") };
        let address = address.into();
        let opcode = store.opcode(1, width.ptx());
        self.emit(format!("{opcode} {address}, {value}"));
    }

    /// `cp.async.cg.shared.global [shared], [global], 16`: an asynchronous 16-byte copy
    /// bypassing L1 (sm_80). Both addresses are 16-byte aligned. Complete it with
    /// [`cp_async_commit`](KernelBuilder::cp_async_commit) and
    /// [`cp_async_wait`](KernelBuilder::cp_async_wait), then a barrier.
    pub fn cp_async_16(&mut self, shared: impl Into<Mem>, global: impl Into<Mem>) {
        self.require_sm(80, "cp.async");
        let (shared, global) = (shared.into(), global.into());
        self.emit(format!("cp.async.cg.shared.global {shared}, {global}, 16"));
    }

    /// [`cp_async_16`](KernelBuilder::cp_async_16) reading only the first `source_bytes`
    /// bytes and zero-filling the rest: `source_bytes = 0` stores 16 zero bytes, which
    /// masks a tile's tail without a branch.
    pub fn cp_async_16_zero_fill(
        &mut self,
        shared: impl Into<Mem>,
        global: impl Into<Mem>,
        source_bytes: impl Into<Operand<U32>>,
    ) {
        self.require_sm(80, "cp.async");
        let (shared, global, source_bytes) = (shared.into(), global.into(), source_bytes.into());
        self.emit(format!(
            "cp.async.cg.shared.global {shared}, {global}, 16, {source_bytes}"
        ));
    }

    /// `cp.async.ca.shared.global [shared], [global], bytes` for 4, 8 or 16 bytes, cached
    /// in L1.
    ///
    /// # Panics
    ///
    /// If `bytes` is not 4, 8 or 16.
    pub fn cp_async_ca(&mut self, shared: impl Into<Mem>, global: impl Into<Mem>, bytes: u32) {
        self.require_sm(80, "cp.async");
        assert!(
            matches!(bytes, 4 | 8 | 16),
            "cp.async.ca copies 4, 8 or 16 bytes, not {bytes}"
        );
        let (shared, global) = (shared.into(), global.into());
        self.emit(format!(
            "cp.async.ca.shared.global {shared}, {global}, {bytes}"
        ));
    }

    /// `cp.async.commit_group`: closes the group of copies issued since the last commit.
    pub fn cp_async_commit(&mut self) {
        self.require_sm(80, "cp.async.commit_group");
        self.emit("cp.async.commit_group".to_string());
    }

    /// `cp.async.wait_group pending`: waits until at most `pending` committed groups are
    /// still in flight (0 waits for all).
    pub fn cp_async_wait(&mut self, pending: u32) {
        self.require_sm(80, "cp.async.wait_group");
        self.emit(format!("cp.async.wait_group {pending}"));
    }

    /// `cp.async.wait_all`: waits for every copy, committed or not.
    pub fn cp_async_wait_all(&mut self) {
        self.require_sm(80, "cp.async.wait_all");
        self.emit("cp.async.wait_all".to_string());
    }

    fn atomic<T: Scalar>(&mut self, opcode: String, address: Mem, operands: &str) -> Reg<T> {
        let d = self.reg::<T>();
        self.emit(format!("{opcode} {d}, {address}, {operands}"));
        d
    }

    /// `atom.<space>.add`: adds `value` at `address` and returns the old value.
    pub fn atom_add<T: AtomicAdd>(
        &mut self,
        space: Space,
        address: impl Into<Mem>,
        value: impl Into<Operand<T>>,
    ) -> Reg<T> {
        let value = value.into();
        let opcode = format!("atom.{}.add.{}", space.ptx(), T::ATOMIC);
        self.atomic(opcode, address.into(), &value.to_string())
    }

    /// `red.<space>.add`: adds `value` at `address`, returning nothing (cheaper than
    /// [`atom_add`](KernelBuilder::atom_add) when the old value is not needed).
    pub fn red_add<T: AtomicAdd>(
        &mut self,
        space: Space,
        address: impl Into<Mem>,
        value: impl Into<Operand<T>>,
    ) {
        let (address, value) = (address.into(), value.into());
        self.emit(format!(
            "red.{}.add.{} {address}, {value}",
            space.ptx(),
            T::ATOMIC
        ));
    }

    /// `atom.<space>.min`: returns the old value.
    pub fn atom_min<T: AtomicMinMax>(
        &mut self,
        space: Space,
        address: impl Into<Mem>,
        value: impl Into<Operand<T>>,
    ) -> Reg<T> {
        let value = value.into();
        let opcode = format!("atom.{}.min.{}", space.ptx(), T::ATOMIC);
        self.atomic(opcode, address.into(), &value.to_string())
    }

    /// `atom.<space>.max`: returns the old value.
    pub fn atom_max<T: AtomicMinMax>(
        &mut self,
        space: Space,
        address: impl Into<Mem>,
        value: impl Into<Operand<T>>,
    ) -> Reg<T> {
        let value = value.into();
        let opcode = format!("atom.{}.max.{}", space.ptx(), T::ATOMIC);
        self.atomic(opcode, address.into(), &value.to_string())
    }

    /// `atom.<space>.exch.bN`: stores `value` and returns the old value.
    pub fn atom_exch<T: AtomicBits>(
        &mut self,
        space: Space,
        address: impl Into<Mem>,
        value: impl Into<Operand<T>>,
    ) -> Reg<T> {
        let value = value.into();
        let opcode = format!("atom.{}.exch.b{}", space.ptx(), T::BITS);
        self.atomic(opcode, address.into(), &value.to_string())
    }

    /// `atom.<space>.cas.bN`: stores `new` where the value equals `compare`; returns the
    /// old value either way.
    pub fn atom_cas<T: AtomicBits>(
        &mut self,
        space: Space,
        address: impl Into<Mem>,
        compare: impl Into<Operand<T>>,
        new: impl Into<Operand<T>>,
    ) -> Reg<T> {
        let (compare, new) = (compare.into(), new.into());
        let opcode = format!("atom.{}.cas.b{}", space.ptx(), T::BITS);
        self.atomic(opcode, address.into(), &format!("{compare}, {new}"))
    }
}
