//! A batch of pending reads and the values it comes back as. Each kind of pending value has its
//! own id type, so a value can only be read as the kind it was deferred as.

use super::Backend;
use crate::mat::Mat64;

/// Index of a pending scalar in its `Reads` batch (and of its value in the `Values` it becomes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScalarId(usize);
/// Index of a pending matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GramId(usize);
/// Index of a pending factor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FactorId(usize);

/// Values still on the backend, to be fetched together. Ids index only the batch that issued them.
pub struct Reads<B: Backend> {
    pub scalars: Vec<B::Scalar>,
    pub grams: Vec<B::Gram>,
    pub factors: Vec<B::Factor>,
}

impl<B: Backend> Default for Reads<B> {
    fn default() -> Self {
        Reads { scalars: Vec::new(), grams: Vec::new(), factors: Vec::new() }
    }
}

impl<B: Backend> Reads<B> {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn scalar(&mut self, p: B::Scalar) -> ScalarId {
        self.scalars.push(p);
        ScalarId(self.scalars.len() - 1)
    }
    pub fn gram(&mut self, p: B::Gram) -> GramId {
        self.grams.push(p);
        GramId(self.grams.len() - 1)
    }
    pub fn factor(&mut self, p: B::Factor) -> FactorId {
        self.factors.push(p);
        FactorId(self.factors.len() - 1)
    }
    /// The pending scalar behind an id (a system assembled on the backend reads it).
    pub fn pending_scalar(&self, id: ScalarId) -> &B::Scalar {
        &self.scalars[id.0]
    }
    pub fn pending_gram(&self, id: GramId) -> &B::Gram {
        &self.grams[id.0]
    }
    /// The pending values behind ids, to accumulate into (`Backend::add_gram`, `add_scalar`).
    pub fn scalar_mut(&mut self, id: ScalarId) -> &mut B::Scalar {
        &mut self.scalars[id.0]
    }
    pub fn gram_mut(&mut self, id: GramId) -> &mut B::Gram {
        &mut self.grams[id.0]
    }
}

/// A fetched batch, in the order of its `Reads`.
#[derive(Clone, Debug, Default)]
pub struct Values {
    pub scalars: Vec<f64>,
    pub grams: Vec<Mat64>,
    /// None where a pivot was not positive.
    pub factors: Vec<Option<Mat64>>,
}

impl Values {
    pub fn gram(&self, id: GramId) -> &Mat64 {
        &self.grams[id.0]
    }
    /// A matrix by value, leaving an empty one in its place.
    pub fn take_gram(&mut self, id: GramId) -> Mat64 {
        std::mem::replace(&mut self.grams[id.0], Mat64::new(0, 0, Vec::new()))
    }
    pub fn take_factor(&mut self, id: FactorId) -> Option<Mat64> {
        self.factors[id.0].take()
    }
}

impl std::ops::Index<ScalarId> for Values {
    type Output = f64;
    fn index(&self, id: ScalarId) -> &f64 {
        &self.scalars[id.0]
    }
}
