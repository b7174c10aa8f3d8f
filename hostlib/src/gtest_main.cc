#include "cvmconf/gtest_support.h"

int main(int argc, char** argv) { return cvm::testing::main(argc, argv); }
